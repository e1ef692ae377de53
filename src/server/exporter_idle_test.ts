/**
 * The idle limit of an export's connections, in one process (an Exporter of a
 * MemoryDevice, real sockets, real time, the limit shortened as `leaseIdleMs` is in
 * exporter_fencing_test.ts). Without it, 64 connections that finish their handshake
 * and then send nothing take every client place (CLIENTS_PER_EXPORT_MAX) for good and
 * lock every other client out. Over a Unix socket, which the per-address limit
 * exempts, so one test process can open all 64.
 */

import assert from "node:assert/strict";
import { CLIENTS_PER_EXPORT_MAX } from "../constants.ts";
import { type Dialer, dialExport, HandshakeRefused, type Link } from "../client/dial.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { silentLogger as quiet } from "../lib/log.ts";
import { Command, WireError } from "../protocol/mod.ts";
import { closeQuietly } from "../transport/byte_conn.ts";
import { within } from "../../tests/helpers/frame_fuzz.ts";
import { RawClient } from "../../tests/helpers/raw_client.ts";
import { waitUntil } from "../../tests/helpers/wait.ts";
import { Exporter } from "./exporter.ts";

const IDLE_MS = 2_000;

Deno.test("64 silent connections lock an export out only until they are idle: then they are closed and a new client gets in, while one that pings stays", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-idle-" });
  const path = `${dir}/export.sock`;
  const exporter = Exporter.serve(
    new MemoryDevice(1024 * 1024),
    Deno.listen({ transport: "unix", path }),
    { connectionIdleMs: IDLE_MS, log: quiet },
  );
  const dial: Dialer = () => Deno.connect({ transport: "unix", path });
  const address = { hostname: path, port: 0 }; // only named in messages: dial() decides
  const links: Link[] = [];
  try {
    for (let i = 0; i < CLIENTS_PER_EXPORT_MAX - 1; i++) {
      links.push(await dialExport(address, { dial }));
    }
    const pinging = await RawClient.connect(address, { dial });
    await assert.rejects(dialExport(address, { dial }), HandshakeRefused, "every place is taken");

    // The pinging client sends a PING every quarter of the limit, for twice the limit.
    let txId = 0;
    const pings = (async () => {
      while (txId < 8) {
        await new Promise((resolve) => setTimeout(resolve, IDLE_MS / 4));
        txId += 1;
        await pinging.send(RawClient.frame({
          command: Command.PING,
          flags: 0,
          txId,
          offset: 0,
          length: 0,
          payloadLength: 0,
        }));
        const { header } = await pinging.reply();
        assert.equal(header.error, WireError.OK);
      }
    })();

    // The silent ones are closed by the export...
    for (const link of links) {
      const n = await within(
        10 * IDLE_MS,
        "the export closing a silent connection",
        link.conn.read(new Uint8Array(1)),
      );
      assert.equal(n, null, "the export closed it");
    }
    // ...which frees their places.
    let newcomer: Link | null = null;
    await waitUntil(
      async () => {
        newcomer = await dialExport(address, { dial }).catch(() => null);
        return newcomer !== null;
      },
      "a new client to be admitted",
      { timeoutMs: 10 * IDLE_MS, everyMs: 100 },
    );
    closeQuietly((newcomer as Link | null)!.conn);
    await within(10 * IDLE_MS, "the pings", pings);
  } finally {
    for (const link of links) closeQuietly(link.conn);
    await exporter.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
});
