// A port of the reference client: open the socket, send what the form submits once it is open,
// and show every message, marked as the client's or the server's. It connects to the host that
// served the page (the reference hard-codes ws://localhost:8000/ws), passing on the page's own
// query string, so that /?room=blue opens /ws?room=blue and plugins see it in conn.query.
function addMessage(message, origin) {
    const item = document.createElement('li');
    item.className = origin;
    item.textContent = message;
    document.getElementById('messages').appendChild(item);
}

window.addEventListener('DOMContentLoaded', (event) => {
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    const socket = new WebSocket(`${scheme}//${window.location.host}/ws${window.location.search}`);
    const status = document.getElementById('status');

    // Connection opened
    socket.addEventListener('open', function (event) {
        status.textContent = 'connected';

        // Send message on form submission
        document.getElementById('form').addEventListener('submit', (event) => {
            event.preventDefault();
            const message = document.getElementById('message').value;

            addMessage(message, 'client');

            socket.send(message);

            event.target.reset();
        });
    });

    // Listen for messages
    socket.addEventListener('message', function (event) {
        addMessage(event.data, 'server');
    });

    socket.addEventListener('close', function (event) {
        status.textContent = `disconnected (${event.code})`;
    });
});
