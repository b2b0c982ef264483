import Foundation
import WSEngineTesting

// Built with `-sanitize=fuzzer -DFUZZING` (dev/fuzz.sh), libFuzzer calls this with each input.
// An input that starts with three upper-case letters (an HTTP method) fuzzes the HTTP side;
// any other starts after a valid handshake, so it reaches the frame decoder.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = Array(UnsafeBufferPointer(start: data, count: size))
    let startsLikeHTTP = input.count >= 3 && input.prefix(3).allSatisfy { (0x41...0x5A).contains($0) }
    FuzzHarness.run(input, withHandshake: !startsLikeHTTP)
    return 0
}

#if FUZZING
/// libFuzzer's entry point (from the -sanitize=fuzzer runtime); it parses its own flags.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt
) -> CInt

@main
struct Fuzz {
    static func main() {
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in fuzzOne(data, size) })
    }
}
#else
/// Without libFuzzer: replays the files (or folders of files) given as arguments.
@main
struct Replay {
    static func main() throws {
        var count = 0
        for path in CommandLine.arguments.dropFirst() {
            let files = (try? FileManager.default.contentsOfDirectory(atPath: path))?.map { "\(path)/\($0)" } ?? [path]
            for file in files.sorted() {
                let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
                bytes.withUnsafeBufferPointer { _ = fuzzOne($0.baseAddress ?? UnsafePointer(bitPattern: 1)!, $0.count) }
                count += 1
            }
        }
        print("replayed \(count) inputs")
    }
}
#endif
