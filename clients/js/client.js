// flasma-ws client for browsers and Node (>= 22, or 20/21 with --experimental-websocket).
// Standard WebSocket API only; no dependencies. Protocol: docs/protocol.md.
//
//   import { FlasmaClient } from "./client.js";
//   const client = new FlasmaClient("ws://127.0.0.1:8080/ws", { binary: true });
//   const hits = await client.query(vector, { k: 5 });    // [[index, score], ...]
//   const many = await client.queryMany(vectors, { k: 5 }); // one such list per vector
//   new FlasmaClient(url, { token: "..." }); // a server started with --token (browsers too)
//
// Requests are pipelined on one connection: call query() from as many places as you like
// without awaiting; answers are matched by id, in whatever order they arrive.

/** The server answered a request with an error; `code` is the wire code (e.g. "bad_k"). */
export class FlasmaServerError extends Error {
  constructor(code, message, id) {
    super(`${code}: ${message}`);
    this.name = "FlasmaServerError";
    this.code = code;
    this.id = id;
  }
}

/** The server could not be reached, or the connection dropped with requests in flight. */
export class FlasmaConnectionError extends Error {
  constructor(message) {
    super(message);
    this.name = "FlasmaConnectionError";
  }
}

const HEADER_BYTES = 16; // u64 id | u16 k | u16 count | u32 timeout_ms, little-endian

/** The subprotocol the server selects; the token travels in a second one (docs/protocol.md). */
export const BEARER_PROTOCOL = "flasma.bearer";

/**
 * The subprotocols that carry `token`: browsers cannot set an Authorization header on a
 * WebSocket. The token goes base64url-encoded (UTF-8, no padding), which keeps any token
 * within the characters a subprotocol name may hold; the server echoes only "flasma.bearer".
 */
export function tokenProtocols(token) {
  const bytes = new TextEncoder().encode(token);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  const encoded = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return [BEARER_PROTOCOL, `${BEARER_PROTOCOL}.${encoded}`];
}

export class FlasmaClient {
  /**
   * @param {string} url ws://HOST:PORT/ws (or wss://)
   * @param {object} [options]
   * @param {boolean} [options.binary=false] binary frames: less CPU on both ends than JSON
   * @param {number} [options.connectAttempts=5] attempts per (re)connect, then an error
   * @param {number} [options.backoffMs=100] first retry delay; doubles up to backoffMaxMs
   * @param {number} [options.backoffMaxMs=2000]
   * @param {string} [options.token] the server's --token, sent as a subprotocol
   * @param {typeof WebSocket} [options.WebSocket] an implementation, if not globalThis's
   */
  constructor(url, options = {}) {
    this.url = url;
    this.binary = options.binary ?? false;
    this.connectAttempts = options.connectAttempts ?? 5;
    this.backoffMs = options.backoffMs ?? 100;
    this.backoffMaxMs = options.backoffMaxMs ?? 2000;
    this.protocols = options.token ? tokenProtocols(options.token) : [];
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) {
      throw new Error("No WebSocket here: use Node >= 22 (or --experimental-websocket).");
    }
    this.nextId = 1;
    this.pending = new Map(); // id -> { resolve, reject, multi }
    this.socket = null;
    this.connecting = null; // the promise of a connection attempt in progress
    this.closed = false;
  }

  /** Open the connection (done on first use anyway), retrying with exponential backoff. */
  connect() {
    if (this.socket) return Promise.resolve();
    if (this.closed) return Promise.reject(new FlasmaConnectionError("The client is closed."));
    if (!this.connecting) {
      this.connecting = this.#openWithBackoff().finally(() => {
        this.connecting = null;
      });
    }
    return this.connecting;
  }

  async #openWithBackoff() {
    let delay = this.backoffMs;
    let problem = "";
    for (let attempt = 1; attempt <= this.connectAttempts; attempt++) {
      try {
        this.socket = await this.#open();
        return;
      } catch (error) {
        problem = error.message;
      }
      if (attempt < this.connectAttempts) {
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, this.backoffMaxMs);
      }
    }
    throw new FlasmaConnectionError(
      `Cannot connect to ${this.url} (${problem}) after ${this.connectAttempts} attempts.`,
    );
  }

  #open() {
    return new Promise((resolve, reject) => {
      const socket = new this.WebSocket(this.url, this.protocols);
      socket.binaryType = "arraybuffer";
      let opened = false;
      let ended = false;
      // Browsers fire "error" then "close"; some Node versions fire only "error" (for a
      // refused connection, say). Either one ends the socket, once.
      const end = (why) => {
        if (ended) return;
        ended = true;
        if (!opened) {
          try {
            socket.close(); // do not leave a half-open attempt behind
          } catch {
            // already closed
          }
          reject(new Error(why));
          return;
        }
        if (this.socket === socket) this.socket = null; // the next request reconnects
        this.#failPending(
          new FlasmaConnectionError(`The connection to ${this.url} was lost (${why}).`),
        );
      };
      socket.onopen = () => {
        opened = true;
        resolve(socket);
      };
      socket.onmessage = (event) => this.#receive(event.data);
      socket.onerror = () => end("network error or refused");
      socket.onclose = (event) => end(`code ${event.code}${event.reason ? ": " + event.reason : ""}`);
    });
  }

  /** Close the connection; requests still in flight fail with FlasmaConnectionError. */
  close() {
    this.closed = true;
    if (this.socket) this.socket.close(1000);
    this.socket = null;
    this.#failPending(new FlasmaConnectionError("The client was closed."));
  }

  /**
   * Top-k of one vector: a promise of [[index, score], ...], best first.
   * @param {ArrayLike<number>} vector
   * @param {{k?: number, timeoutMs?: number}} [options] k defaults to the server's --top-k
   */
  query(vector, options = {}) {
    return this.#request([vector], false, options);
  }

  /** Top-k of several vectors in one frame: a promise of one [[index, score], ...] per vector. */
  queryMany(vectors, options = {}) {
    if (vectors.length === 0) return Promise.reject(new Error("queryMany needs vectors."));
    return this.#request(vectors, true, options);
  }

  /**
   * Writes and reads by key, on a server with writes enabled (`writable` in /info): each
   * resolves with the server's answer, less its id: {upserted: n}, {deleted: n}, {items}.
   * @param {{key: number|string, embedding: ArrayLike<number>}[]} items
   */
  upsert(items) {
    const frame = items.map(({ key, embedding }) => ({ key, embedding: Array.from(embedding) }));
    return this.#op({ op: "upsert", items: frame });
  }

  /** @param {(number|string)[]} keys */
  delete(keys) {
    return this.#op({ op: "delete", keys });
  }

  /** The stored (normalized) vectors of `keys`: {items: [{key, embedding} or null, ...]}. */
  get(keys) {
    return this.#op({ op: "get", keys });
  }

  async #op(request) {
    if (!this.socket) await this.connect();
    const id = this.nextId++;
    return this.#send(id, JSON.stringify({ id, ...request }), { whole: true });
  }

  async #request(vectors, multi, { k, timeoutMs } = {}) {
    if (!this.socket) await this.connect();
    const id = this.nextId++;
    const frame = this.binary
      ? encodeBinary(id, vectors, k, timeoutMs)
      : encodeJson(id, vectors, multi, k, timeoutMs);
    return this.#send(id, frame, { multi });
  }

  #send(id, frame, { multi = false, whole = false }) {
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, multi, whole });
      try {
        this.socket.send(frame);
      } catch (error) {
        this.pending.delete(id);
        reject(new FlasmaConnectionError(`Sending to ${this.url} failed: ${error.message}`));
      }
    });
  }

  #receive(data) {
    if (typeof data === "string") {
      const answer = JSON.parse(data);
      const waiter = this.pending.get(answer.id);
      if (!waiter) return; // an error about a frame we could not have sent (id null)
      this.pending.delete(answer.id);
      if (answer.error) {
        waiter.reject(new FlasmaServerError(answer.error.code, answer.error.message, answer.id));
      } else if (waiter.whole) {
        delete answer.id;
        waiter.resolve(answer);
      } else {
        waiter.resolve(answer.result ?? answer.results);
      }
      return;
    }
    const { id, results } = decodeBinary(data);
    const waiter = this.pending.get(id);
    if (!waiter) return;
    this.pending.delete(id);
    waiter.resolve(waiter.multi ? results : results[0]);
  }

  #failPending(error) {
    const waiters = [...this.pending.values()];
    this.pending.clear();
    for (const waiter of waiters) waiter.reject(error);
  }
}

function encodeJson(id, vectors, multi, k, timeoutMs) {
  const request = { id };
  if (multi) request.embeddings = vectors.map((v) => Array.from(v));
  else request.embedding = Array.from(vectors[0]);
  if (k !== undefined) request.k = k;
  if (timeoutMs !== undefined) request.timeout_ms = timeoutMs;
  return JSON.stringify(request);
}

function encodeBinary(id, vectors, k, timeoutMs) {
  if (k !== undefined && !(k >= 1 && k <= 65535)) {
    // 0 would silently mean "the server's default" in a binary header.
    throw new RangeError(`k must be from 1 to 65535 in a binary frame; got ${k}.`);
  }
  const dim = vectors[0].length;
  const buffer = new ArrayBuffer(HEADER_BYTES + 4 * vectors.length * dim);
  const view = new DataView(buffer);
  view.setBigUint64(0, BigInt(id), true);
  view.setUint16(8, k ?? 0, true);
  view.setUint16(10, vectors.length, true);
  view.setUint32(12, timeoutMs ?? 0, true);
  let offset = HEADER_BYTES;
  for (const vector of vectors) {
    if (vector.length !== dim) throw new RangeError("All vectors must have the same length.");
    for (let i = 0; i < dim; i++, offset += 4) view.setFloat32(offset, vector[i], true);
  }
  return buffer;
}

function decodeBinary(buffer) {
  const view = new DataView(buffer);
  const id = Number(view.getBigUint64(0, true));
  const k = view.getUint16(8, true);
  const count = view.getUint16(10, true);
  const scoresAt = HEADER_BYTES + 4 * count * k;
  const results = [];
  for (let q = 0; q < count; q++) {
    const hits = [];
    for (let j = 0; j < k; j++) {
      const at = 4 * (q * k + j);
      hits.push([view.getUint32(HEADER_BYTES + at, true), view.getFloat32(scoresAt + at, true)]);
    }
    results.push(hits);
  }
  return { id, results };
}
