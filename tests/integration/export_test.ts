/**
 * `dst export` and `dst status` through the real CLI (dist/dst.js), as a user runs
 * them: data written through the client reads back and is in the image file; status
 * reports it; a read-only export refuses writes; bad requests get error replies and
 * the export keeps serving; SIGTERM stops it cleanly.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { DeviceError } from "../../src/lib/errors.ts";
import { Command, RequestFlag, WireError } from "../../src/protocol/mod.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { RawClient } from "../helpers/raw_client.ts";
import { newDisk, runDst, startDst, startExport, stopClean, withExport } from "../helpers/spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";
import { CLIENTS_PER_ADDRESS_MAX } from "../../src/constants.ts";
import { eventually } from "../helpers/frame_fuzz.ts";

const MiB = 1024 * 1024;

Deno.test("export serves writes and reads, status reports them, SIGTERM exits 0", async () => {
  await withExport("dst-export-serves-", newDisk("16M"), async (server, dir) => {
    const image = `${dir}/disk.img`;
    const client = await RemoteDevice.connect(server.address, { log: quiet });
    assert.equal(client.info.sizeBytes, 16 * MiB);
    assert.equal(client.info.blockSize, 4096);
    assert.equal(client.info.readOnly, false);
    assert.deepEqual(await client.queryInfo(), {
      sizeBytes: 16 * MiB,
      blockSize: 4096,
      exportFlags: 0,
    });
    const data = randomBytes(3 * MiB + 123);
    await client.write(777, data, { fua: true });
    const back = new Uint8Array(data.length);
    await client.read(777, back);
    assertSameBytes(back, data, "read back");
    await client.flush();

    const table = await runDst(["status", `127.0.0.1:${server.address.port}`]);
    assert.equal(table.code, 0, table.stderr);
    assert.match(table.stdout, /PATH/);
    assert.ok(table.stdout.includes(image), table.stdout);
    assert.match(table.stdout, /16\.0 MiB/);

    const json = await runDst(["status", "--json", `127.0.0.1:${server.address.port}`]);
    assert.equal(json.code, 0, json.stderr);
    const [row] = JSON.parse(json.stdout);
    assert.equal(row.status.name, image);
    assert.equal(row.status.sizeBytes, 16 * MiB);
    assert.equal(row.status.blockSize, 4096);
    assert.equal(row.status.readOnly, false);
    assert.equal(row.status.clients, 1, "the client above, not the status query");
    assert.equal(row.status.inFlight, 0);
    assert.ok(row.status.writes >= 1);
    assert.equal(row.status.writtenBytes, data.length);
    assert.equal(row.status.readBytes, data.length);
    assert.equal(row.status.errors, 0);
    assert.ok(row.status.uptimeMs > 0);
    await client.close();

    const status = await server.stop("SIGTERM");
    assert.equal(status.code, 0, server.log());
    const onDisk = await Deno.readFile(image);
    assertSameBytes(onDisk.subarray(777, 777 + data.length), data, "image file");
    assert.equal(onDisk.length, 16 * MiB);
  });
});

Deno.test("a read-only export refuses writes with EPERM and still serves reads", async () => {
  const content = randomBytes(MiB);
  await withExport("dst-export-read-only-", async (dir) => {
    await Deno.writeFile(`${dir}/disk.img`, content);
    return [`${dir}/disk.img`, "--read-only", "--listen", "127.0.0.1:0"];
  }, async (server, dir) => {
    const image = `${dir}/disk.img`;
    const client = await RemoteDevice.connect(server.address, { log: quiet });
    assert.equal(client.info.readOnly, true);
    await assert.rejects(
      client.write(0, new Uint8Array(4096)),
      (e) => e instanceof DeviceError && e.errno === "EPERM",
    );

    // The client refuses locally; the export must refuse too, whatever a client sends.
    const raw = await RawClient.connect(server.address);
    await raw.send(RawClient.frame(
      { command: Command.WRITE, flags: 0, txId: 1, offset: 0, length: 4096, payloadLength: 4096 },
      new Uint8Array(4096),
    ));
    await raw.send(
      RawClient.frame({
        command: Command.DISCARD,
        flags: 0,
        txId: 2,
        offset: 0,
        length: 4096,
        payloadLength: 0,
      }),
    );
    await raw.send(
      RawClient.frame({
        command: Command.READ,
        flags: 0,
        txId: 3,
        offset: 4096,
        length: 4096,
        payloadLength: 0,
      }),
    );
    const replies = [await raw.reply(), await raw.reply(), await raw.reply()];
    const byId = new Map(replies.map((r) => [r.header.txId, r]));
    assert.equal(byId.get(1)!.header.error, WireError.EPERM);
    assert.equal(byId.get(2)!.header.error, WireError.EPERM);
    assert.equal(byId.get(3)!.header.error, WireError.OK);
    assertSameBytes(byId.get(3)!.payload, content.subarray(4096, 8192), "read after refused write");
    raw.close();
    await client.close();
    assertSameBytes(await Deno.readFile(image), content, "a read-only image is unchanged");
  });
});

Deno.test("bad requests get error replies and the same connection keeps working", async () => {
  await withExport("dst-export-bad-requests-", newDisk("1M"), async (server) => {
    const raw = await RawClient.connect(server.address);
    const frame = RawClient.frame;
    const cases: Array<[string, Uint8Array, number]> = [
      [
        "read past the end",
        frame({
          command: Command.READ,
          flags: 0,
          txId: 10,
          offset: MiB - 512,
          length: 4096,
          payloadLength: 0,
        }),
        WireError.EINVAL,
      ],
      [
        "write past the end",
        frame({
          command: Command.WRITE,
          flags: 0,
          txId: 11,
          offset: MiB,
          length: 8,
          payloadLength: 8,
        }, new Uint8Array(8)),
        WireError.ENOSPC,
      ],
      [
        "zeroes past the end",
        frame({
          command: Command.WRITE_ZEROES,
          flags: 0,
          txId: 12,
          offset: 2 * MiB,
          length: 1,
          payloadLength: 0,
        }),
        WireError.ENOSPC,
      ],
      [
        "unknown command",
        frame(
          { command: 99, flags: 0, txId: 13, offset: 0, length: 16, payloadLength: 16 },
          new Uint8Array(16).fill(0xee),
        ),
        WireError.ENOTSUP,
      ],
      [
        "FUA on a read",
        frame({
          command: Command.READ,
          flags: RequestFlag.FUA,
          txId: 14,
          offset: 0,
          length: 512,
          payloadLength: 0,
        }),
        WireError.EINVAL,
      ],
      [
        "zero-length write",
        frame({
          command: Command.WRITE,
          flags: 0,
          txId: 15,
          offset: 0,
          length: 0,
          payloadLength: 0,
        }),
        WireError.EINVAL,
      ],
      [
        "payload on a flush",
        frame({
          command: Command.FLUSH,
          flags: 0,
          txId: 16,
          offset: 0,
          length: 0,
          payloadLength: 4,
        }, new Uint8Array(4)),
        WireError.EINVAL,
      ],
    ];
    for (const [what, bytes, expected] of cases) {
      await raw.send(bytes);
      const { header } = await raw.reply();
      assert.equal(header.error, expected, what);
    }
    // After all of that, the stream is still framed: a write and a read work.
    const data = randomBytes(4096);
    await raw.send(
      frame({
        command: Command.WRITE,
        flags: 0,
        txId: 20,
        offset: 8192,
        length: 4096,
        payloadLength: 4096,
      }, data),
    );
    assert.equal((await raw.reply()).header.error, WireError.OK);
    await raw.send(
      frame({
        command: Command.READ,
        flags: 0,
        txId: 21,
        offset: 8192,
        length: 4096,
        payloadLength: 0,
      }),
    );
    const { header, payload } = await raw.reply();
    assert.equal(header.error, WireError.OK);
    assertSameBytes(payload, data, "read after bad requests");
    raw.close();

    const status = await runDst(["status", "--json", `127.0.0.1:${server.address.port}`]);
    assert.equal(JSON.parse(status.stdout)[0].status.errors, cases.length);
  });
});

Deno.test("a frame that breaks framing closes that connection only, with one log line", async () => {
  await withExport("dst-export-bad-framing-", newDisk("1M"), async (server) => {
    const bystander = await RemoteDevice.connect(server.address, { log: quiet });
    const data = randomBytes(65536);
    await bystander.write(0, data);

    const badMagic = await RawClient.connect(server.address);
    await badMagic.send(new Uint8Array(32).fill(0x41));
    assert.ok(await badMagic.closedWithin(5000), "bad magic closes the connection");

    const oversized = await RawClient.connect(server.address);
    const frame = RawClient.frame({
      command: Command.WRITE,
      flags: 0,
      txId: 1,
      offset: 0,
      length: 0,
      payloadLength: 0,
    });
    new DataView(frame.buffer).setUint32(28, 0xffff_fff0, true); // payload length far past the limit
    await oversized.send(frame);
    assert.ok(await oversized.closedWithin(5000), "an oversized frame closes the connection");

    // Garbage instead of a hello: the handshake is refused, nothing is written.
    const garbage = await Deno.connect(server.address);
    await garbage.write(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n    "));
    const n = await garbage.read(new Uint8Array(1024));
    assert.equal(n, null, "a non-DST client gets no hello");
    garbage.close();

    const back = new Uint8Array(data.length);
    await bystander.read(0, back);
    assertSameBytes(back, data, "the other client is still served");
    await bystander.close();
    const log = server.log();
    assert.match(log, /bad request magic 0x41414141; closing this connection/);
    assert.match(log, /payload length 4294967280 > 33554432; closing this connection/);
    assert.match(log, /handshake refused: not a DST client/);
  });
});

Deno.test("one address gets at most CLIENTS_PER_ADDRESS_MAX connections; the next is closed before any handshake", async () => {
  await withExport("dst-export-per-address-", newDisk("1M"), async (server) => {
    const clients: RawClient[] = [];
    for (let i = 0; i < CLIENTS_PER_ADDRESS_MAX; i++) {
      clients.push(await RawClient.connect(server.address));
    }

    // Over the limit: closed at once, without reading the hello it would have sent.
    const over = await Deno.connect(server.address);
    assert.equal(await over.read(new Uint8Array(1024)), null, "closed before any handshake");
    over.close();
    await eventually(5000, "the refusal's log line", () => /refused/.test(server.log()));
    assert.match(
      server.log(),
      new RegExp(`127\\.0\\.0\\.1: connection refused, ${CLIENTS_PER_ADDRESS_MAX}`),
    );

    // The first ones are still served, and when one leaves a new one gets in.
    const served = await RawClient.connect(server.address).then(
      () => "admitted",
      () => "refused",
    );
    assert.equal(served, "refused", "still full");
    clients.pop()!.conn.close();
    await eventually(
      5000,
      "the server to see the client leave",
      () => server.log().includes(`client left (${CLIENTS_PER_ADDRESS_MAX - 1} now)`),
    );
    clients.push(await RawClient.connect(server.address));
    for (const client of clients) client.conn.close();
  });
});

Deno.test("the CLI explains bad usage and missing files", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-cli-usage-" });
  try {
    const noPath = await runDst(["export"]);
    assert.equal(noPath.code, 2);
    assert.match(noPath.stderr, /takes one PATH/);

    const both = await runDst(["export", `${dir}/x.img`, "--create", "1M", "--read-only"]);
    assert.equal(both.code, 2);
    assert.match(both.stderr, /cannot go with --read-only/);

    const badSize = await runDst(["export", `${dir}/x.img`, "--create", "lots"]);
    assert.equal(badSize.code, 2);
    assert.match(badSize.stderr, /Cannot read --create "lots"/);

    const missing = await runDst(["export", `${dir}/missing.img`, "--listen", "127.0.0.1:0"]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /missing\.img does not exist; use --create SIZE to make it/);

    await Deno.writeFile(`${dir}/empty.img`, new Uint8Array());
    const empty = await runDst(["export", `${dir}/empty.img`, "--listen", "127.0.0.1:0"]);
    assert.equal(empty.code, 1);
    assert.match(empty.stderr, /--create SIZE/);

    const badListen = await runDst([
      "export",
      `${dir}/x.img`,
      "--create",
      "1M",
      "--listen",
      "127.0.0.1:99999",
    ]);
    assert.equal(badListen.code, 2);
    assert.match(badListen.stderr, /is not a port/);

    const unknown = await runDst(["frobnicate"]);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /unknown command "frobnicate"/);

    const unreachable = await runDst(["status", "127.0.0.1:1"]);
    assert.equal(unreachable.code, 1);
    assert.match(unreachable.stdout, /127\.0\.0\.1:1: Cannot connect/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a client that ignores the in-flight limit is throttled, not refused: every request is answered", async () => {
  const content = randomBytes(4 * MiB);
  await withExport("dst-export-throttled-", async (dir) => {
    await Deno.writeFile(`${dir}/disk.img`, content);
    return [`${dir}/disk.img`, "--listen", "127.0.0.1:0"];
  }, async (server) => {
    const raw = await RawClient.connect(server.address);
    const count = 300; // more than the 128 allowed in flight, and 300 MiB of reads: past the byte budget
    const frames = new Uint8Array(count * 32);
    for (let i = 0; i < count; i++) {
      const offset = (i % 4) * MiB;
      frames.set(
        RawClient.frame({
          command: Command.READ,
          flags: 0,
          txId: i + 1,
          offset,
          length: MiB,
          payloadLength: 0,
        }),
        i * 32,
      );
    }
    await raw.send(frames);
    const seen = new Set<number>();
    for (let i = 0; i < count; i++) {
      const { header, payload } = await raw.reply();
      assert.equal(header.error, WireError.OK);
      const offset = ((header.txId - 1) % 4) * MiB;
      assertSameBytes(payload, content.subarray(offset, offset + MiB), `reply ${header.txId}`);
      seen.add(header.txId);
    }
    assert.equal(seen.size, count);
    raw.close();
  });
});

Deno.test("an export reachable beyond loopback without a key warns that anyone who can reach it can read and write it; on 127.0.0.1 or with --key it does not", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-open-" });
  try {
    const keys = `${dir}/site.keys`;
    assert.equal((await runDst(["keygen", keys, "--name", "site"])).code, 0);
    const cases = [["0.0.0.0:0", true, []], ["127.0.0.1:0", false, []], [
      "0.0.0.0:0",
      false,
      ["--key", keys],
    ]] as const;
    for (const [listen, warns, extra] of cases) {
      const server = await startExport([
        `${dir}/disk.img`,
        "--create",
        "1M",
        "--listen",
        listen,
        ...extra,
      ]);
      try {
        await stopClean(server, `export on ${listen}`);
        const said = /can be reached beyond this machine without a key: anyone/.test(
          server.log(),
        );
        assert.equal(said, warns, `${listen} ${extra.join(" ")}:\n${server.log()}`);
      } finally {
        await server.stop("SIGKILL");
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("export --help and the start-up line say DST listens on all interfaces by default and NBD on loopback", async () => {
  const help = await runDst(["export", "--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /default 0\.0\.0\.0:1025: all interfaces/);
  assert.match(help.stdout, /default 127\.0\.0\.1:10809: loopback only/);

  const dir = await Deno.makeTempDir({ prefix: "dst-interfaces-" });
  try {
    for (
      const [listen, nbd, all] of [["0.0.0.0:0", "0.0.0.0:0", true], [
        "127.0.0.1:0",
        "127.0.0.1:0",
        false,
      ]] as const
    ) {
      const server = await startDst(
        [
          "export",
          `${dir}/disk.img`,
          "--create",
          "1M",
          "--listen",
          listen,
          "--nbd",
          nbd,
          "--nbd-threads",
          "1",
        ],
        /^(.*) on (\S+)\n(.*) at (nbd\S+)\n/m,
      );
      try {
        const [, dstLine, address, nbdLine] = server.ready;
        assert.equal(/, all interfaces,$/.test(dstLine!), all, dstLine);
        assert.match(address!, all ? /^0\.0\.0\.0:\d+$/ : /^127\.0\.0\.1:\d+$/);
        assert.equal(/, all interfaces,$/.test(nbdLine!), all, nbdLine);
      } finally {
        await stopClean(server, `export on ${listen}`);
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
