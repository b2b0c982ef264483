import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import WSEngine

/// TLS for `--tls-cert` and `--tls-key`: the certificate chain and key in force, as an
/// `NIOSSLContext` that every accepted connection reads once (its handler keeps it for its
/// life). `reload` reads the files again and swaps the context under a lock: a new connection
/// sees the new certificate, an existing one keeps the one it started with. A pair that does not
/// load is refused and the old one keeps serving.
final class CertificateStore: ConnectionSecurity {
    let certificatePath: String
    let keyPath: String
    private let context: NIOLockedValueBox<NIOSSLContext>
    /// Reloads by result (`success`, `failure`), for `/metrics`.
    private let reloads = NIOLockedValueBox<[String: Int]>([:])

    /// Why a certificate pair did not load, in words for an operator.
    struct LoadError: Error, CustomStringConvertible {
        var description: String
    }

    init(certificate: String, key: String) throws(LoadError) {
        certificatePath = certificate
        keyPath = key
        context = NIOLockedValueBox(try Self.load(certificate: certificate, key: key))
    }

    func makeHandler() throws -> ChannelHandler {
        NIOSSLServerHandler(context: context.withLockedValue { $0 })
    }

    /// Reads the files again; on success new connections get the new pair.
    func reload() throws(LoadError) {
        do {
            let fresh = try Self.load(certificate: certificatePath, key: keyPath)
            context.withLockedValue { $0 = fresh }
            reloads.withLockedValue { $0["success", default: 0] += 1 }
        } catch {
            reloads.withLockedValue { $0["failure", default: 0] += 1 }
            throw error
        }
    }

    var reloadCounts: [String: Int] { reloads.withLockedValue { $0 } }

    /// A context for the PEM chain (leaf first, then intermediates) in `certificate` and the
    /// PEM key in `key`; errors say which file and what is wrong with it.
    static func load(certificate: String, key: String) throws(LoadError) -> NIOSSLContext {
        for (option, path) in [("--tls-cert", certificate), ("--tls-key", key)] {
            guard FileManager.default.isReadableFile(atPath: path) else {
                throw LoadError(description: "\(option) \(path): no such file, or not readable")
            }
        }
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificate)
        } catch {
            throw LoadError(description: "--tls-cert \(certificate): not a PEM certificate (\(error))")
        }
        guard !chain.isEmpty else {
            throw LoadError(description: "--tls-cert \(certificate): no certificate in the file")
        }
        let privateKey: NIOSSLPrivateKey
        do {
            privateKey = try NIOSSLPrivateKey(file: key, format: .pem)
        } catch {
            throw LoadError(description: "--tls-key \(key): not a PEM private key (\(error))")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        configuration.minimumTLSVersion = .tlsv12
        configuration.applicationProtocols = ["http/1.1"]
        do {
            // BoringSSL checks here that the key belongs to the first certificate.
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw LoadError(description: "--tls-key \(key) does not match the certificate in --tls-cert \(certificate) (\(error))")
        }
    }
}
