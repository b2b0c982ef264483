// Node + ws (Debian's node-ws): the same behaviour as the reference: echo with a prefix, and
// "It is: <time>" after 10 s without a message. permessage-deflate is on, set as luaws's is:
// no context takeover either way, replies of 128 bytes or more compressed, zlib's default level;
// it costs nothing to a client that does not offer it (the loads without -z).
const { WebSocketServer } = require('ws');
const port = parseInt(process.argv[2] || '8000', 10);
const wss = new WebSocketServer({
  host: '127.0.0.1', port, path: '/ws',
  perMessageDeflate: { serverNoContextTakeover: true, clientNoContextTakeover: true, threshold: 128 },
});
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
