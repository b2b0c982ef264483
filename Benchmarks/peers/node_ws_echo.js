// Node + ws (Debian's node-ws): the same behaviour as the reference: echo with a prefix, and
// "It is: <time>" after 10 s without a message.
const { WebSocketServer } = require('ws');
const port = parseInt(process.argv[2] || '8000', 10);
const wss = new WebSocketServer({ host: '127.0.0.1', port, path: '/ws', perMessageDeflate: false });
wss.on('connection', (ws) => {
  let timer;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => { ws.send('It is: ' + new Date().toISOString().replace('Z', '')); arm(); }, 10000);
  };
  arm();
  ws.on('message', (data) => { ws.send('Message received: ' + data.toString()); arm(); });
  ws.on('close', () => clearTimeout(timer));
});
