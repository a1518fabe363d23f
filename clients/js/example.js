// Node example: pipelined queries on one connection, JSON and binary, and a server error.
//   node example.js [ws://HOST:PORT/ws]                          (Node >= 22)
//   node --experimental-websocket example.js [ws://HOST:PORT/ws] (Node 20, 21)
import { FlasmaClient, FlasmaServerError } from "./client.js";

const url = process.argv[2] ?? "ws://127.0.0.1:8080/ws";
const info = await (await fetch(url.replace(/^ws/, "http").replace(/\/ws$/, "/info"))).json();
const randomVector = () => Array.from({ length: info.dim }, () => Math.random() - 0.5);

for (const binary of [false, true]) {
  const client = new FlasmaClient(url, { binary });
  const started = performance.now();
  // 200 requests in flight at once on one connection; answers come back in any order.
  const answers = await Promise.all(
    Array.from({ length: 200 }, () => client.query(randomVector(), { k: 5 })),
  );
  const elapsed = performance.now() - started;
  console.log(
    `${binary ? "binary" : "JSON  "}: 200 queries in ${elapsed.toFixed(1)} ms; ` +
      `first: ${JSON.stringify(answers[0].map(([i, s]) => [i, +s.toFixed(4)]))}`,
  );
  const many = await client.queryMany([randomVector(), randomVector()], { k: 3 });
  console.log(`        queryMany: ${many.length} lists of ${many[0].length}`);
  try {
    await client.query(randomVector(), { k: info.max_k + 1 });
  } catch (error) {
    if (!(error instanceof FlasmaServerError)) throw error;
    console.log(`        refused as expected: ${error.code}`);
  }
  client.close();
}
