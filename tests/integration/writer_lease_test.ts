/**
 * An export's writer lease, with real processes on loopback: while one `dst attach`
 * holds the lease a second writer attach is refused, naming the holder and what to do,
 * and a read-only attach reads but cannot write; `dst status` shows the holder; a
 * holder that goes silent (SIGSTOP) loses the lease within 40 s and one that is
 * killed loses it at once; with --shared-writers two attaches both write; the
 * export's own --nbd port is one writer that DST writers wait for, and the other way
 * round; a mirror restarted with the same --state takes its lease back at once (also
 * from a frozen copy of itself), while a mirror with another --state is refused. The
 * images are checked byte for byte: only the lease holder's writes are in them.
 */

import assert from "node:assert/strict";
import { HandshakeRefused } from "../../src/client/dial.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import type { HostPort } from "../../src/lib/address.ts";
import type { ExportStatus } from "../../src/server/exporter.ts";
import { memberName, startArray, startNewMirror, waitForMirror } from "../helpers/array.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import {
  exportImage,
  runDst,
  type RunningAttach,
  scenario,
  startAttach,
  stopClean,
} from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const MiB = 1024 * 1024;

/** The bound: a silent holder (30 s idle, checked every 2 s) is replaced within 40 s. */
const SILENT_HOLDER_REPLACED_MS = 40_000;
/** A holder whose connections closed (killed, or the NBD client left): "within a few seconds". */
const CLOSED_HOLDER_REPLACED_MS = 5_000;
/** How often a test tries again while it waits for the lease to free. */
const RETRY_MS = 500;

/** Writes `data` at `offset` through the NBD server at `uri`, with nbdsh (the data goes by file). */
async function nbdWrite(uri: string, offset: number, data: Uint8Array, dir: string): Promise<void> {
  const path = await Deno.makeTempFile({ dir, prefix: "nbd-write-" });
  await Deno.writeFile(path, data);
  await toolOk("nbdsh", [
    "-u",
    uri,
    "-c",
    `h.pwrite(open(${JSON.stringify(path)}, "rb").read(), ${offset})`,
  ]);
  await Deno.remove(path);
}

/** Reads `length` bytes at `offset` through the NBD server at `uri`, with nbdsh. */
async function nbdRead(
  uri: string,
  offset: number,
  length: number,
  dir: string,
): Promise<Uint8Array> {
  const path = await Deno.makeTempFile({ dir, prefix: "nbd-read-" });
  await toolOk("nbdsh", [
    "-u",
    uri,
    "-c",
    `open(${JSON.stringify(path)}, "wb").write(h.pread(${length}, ${offset}))`,
  ]);
  const data = await Deno.readFile(path);
  await Deno.remove(path);
  return data;
}

/** nbdsh code: one 4 KiB write at `offset`; prints "written", or "EPERM" when refused so. */
function nbdshTryWrite(offset: number): string {
  return `
import errno
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)
try:
    h.pwrite(b"\\x66" * 4096, ${offset})
    print("written")
except nbd.Error as e:
    print("EPERM" if e.errnum == errno.EPERM else "errno %d: %s" % (e.errnum, e))
`;
}

/** `dst status ADDR --json`: the export's status document. */
async function statusOf(address: HostPort): Promise<ExportStatus> {
  const result = await runDst(["status", memberName(address), "--json"]);
  assert.equal(result.code, 0, `dst status: ${result.stdout}${result.stderr}`);
  const [row] = JSON.parse(result.stdout) as Array<{ status: ExportStatus }>;
  return row!.status;
}

/** The lease holder `dst status` shows; fails when nobody holds the lease. */
async function holderOf(address: HostPort): Promise<NonNullable<ExportStatus["writeLease"]>> {
  const status = await statusOf(address);
  assert.equal(status.sharedWriters, false);
  assert.ok(status.writeLease !== null, `nobody holds the lease: ${JSON.stringify(status)}`);
  return status.writeLease;
}

/**
 * Whether process `pid` owns the TCP connection whose local end is `peer`
 * ("127.0.0.1:PORT", as the export names a lease holder): Linux's /proc/net/tcp maps
 * the port to a socket inode, and /proc/PID/fd holds the process's sockets.
 */
async function ownsConnection(pid: number, peer: string): Promise<boolean> {
  const port = Number(peer.slice(peer.lastIndexOf(":") + 1));
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  const sockets = (await Deno.readTextFile("/proc/net/tcp")).split("\n").slice(1)
    .map((line) => line.trim().split(/\s+/))
    .filter((fields) => fields[1] === local)
    .map((fields) => `socket:[${fields[9]}]`);
  for await (const entry of Deno.readDir(`/proc/${pid}/fd`)) {
    try {
      if (sockets.includes(await Deno.readLink(`/proc/${pid}/fd/${entry.name}`))) return true;
    } catch {
      // closed meanwhile
    }
  }
  return false;
}

/**
 * Tries `attempt` every RETRY_MS until it gets the lease, and fails unless that is
 * within `withinMs` of `sinceMs` (performance.now()). `attempt` returns null while
 * the lease is held by another, and throws on any other failure.
 */
async function whenLeaseFrees<T>(
  what: string,
  sinceMs: number,
  withinMs: number,
  attempt: () => Promise<T | null>,
): Promise<T> {
  for (let tries = 1;; tries++) {
    const got = await attempt();
    const elapsed = performance.now() - sinceMs;
    if (got !== null) {
      assert.ok(
        elapsed <= withinMs,
        `${what} got the lease only after ${Math.round(elapsed)} ms (> ${withinMs} ms)`,
      );
      return got;
    }
    if (elapsed > withinMs) {
      throw new Error(
        `${what}: the lease was still held after ${Math.round(elapsed)} ms ` +
          `(${tries} tries; it should be free within ${withinMs} ms)`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

/** Starts a writer attach, or returns null when the export refuses it for the lease. */
async function attachWriter(target: string, socket: string): Promise<RunningAttach | null> {
  try {
    return await startAttach([target, "--socket", socket]);
  } catch (error) {
    if (error instanceof Error && error.message.includes("the write lease is held by")) {
      return null;
    }
    throw error;
  }
}

/** A DST writer of the export, or null when the export refuses it for the lease. */
async function connectWriter(address: HostPort): Promise<RemoteDevice | null> {
  try {
    return await RemoteDevice.connect(address, { log: quiet, retries: 0 });
  } catch (error) {
    if (error instanceof HandshakeRefused && error.code === "WRITE_LEASE_HELD") return null;
    throw error;
  }
}

Deno.test({
  name:
    "two attaches: the second cannot write while the first holds the lease; the image holds only the first's data; a new writer gets the lease within 40 s of the first going silent",
  ignore: missing("nbdsh"),
  fn: () =>
    scenario("dst-lease-attach-", async (dir, track) => {
      const server = track(await exportImage(dir, "disk.img", "4M"));
      const target = memberName(server.address);
      const expected = new Uint8Array(4 * MiB);

      const a = track(await startAttach([target, "--socket", `${dir}/a.sock`]));
      const dataA = randomBytes(2 * MiB);
      await nbdWrite(a.uri, 0, dataA, dir);
      expected.set(dataA, 0);

      const holderA = await holderOf(server.address);
      assert.equal(holderA.connections, 1);
      assert.equal((await statusOf(server.address)).writeGeneration, 1, "A's grant");
      assert.ok(
        await ownsConnection(a.process.pid, holderA.peer),
        `dst status names ${holderA.peer} as the holder, which is not attach A's connection`,
      );

      // A second writer attach: refused in the handshake, told who holds the lease and what to do.
      const refused = await startAttach([target, "--socket", `${dir}/b.sock`]).then(
        (b) => {
          track(b);
          return null;
        },
        (error: Error) => error,
      );
      assert.ok(refused !== null, "a second writer attach started while A holds the lease");
      assert.match(refused.message, /exited \(1\) before serving/);
      assert.ok(
        refused.message.includes(
          `the write lease is held by ${holderA.peer} (client ${holderA.clientId.slice(0, 8)}`,
        ),
        refused.message,
      );
      assert.match(refused.message, /--read-only/, "it says how to go on: read-only");
      assert.match(refused.message, /--shared-writers/);

      // Read-only: it starts, reads A's data, and cannot write.
      const b = track(await startAttach([target, "--read-only", "--socket", `${dir}/b.sock`]));
      assertSameBytes(await nbdRead(b.uri, 0, 2 * MiB, dir), dataA, "A's data read through B");
      const tried = await toolOk("nbdsh", ["-u", b.uri, "-c", nbdshTryWrite(3 * MiB)]);
      assert.equal(tried.trim(), "EPERM", "a write through the read-only attach");
      assert.ok(!(await ownsConnection(b.process.pid, holderA.peer)), "B is not the holder");
      await stopClean(b, "read-only attach B");
      assert.equal((await holderOf(server.address)).clientId, holderA.clientId);
      assert.equal(
        (await statusOf(server.address)).writeGeneration,
        1,
        "neither the refused writer nor the reader started a write generation",
      );

      // A goes silent: its connection stays open, but sends nothing (not even pings).
      Deno.kill(a.process.pid, "SIGSTOP");
      const silentSince = performance.now();
      try {
        assert.equal(
          (await holderOf(server.address)).clientId,
          holderA.clientId,
          "a silent holder keeps the lease for a while",
        );
        const c = track(
          await whenLeaseFrees(
            "writer attach C after A was stopped",
            silentSince,
            SILENT_HOLDER_REPLACED_MS,
            () => attachWriter(target, `${dir}/c.sock`),
          ),
        );
        const holderC = await holderOf(server.address);
        assert.notEqual(holderC.clientId, holderA.clientId);
        assert.ok(await ownsConnection(c.process.pid, holderC.peer), "C holds the lease");
        assert.equal((await statusOf(server.address)).writeGeneration, 2, "C's grant");
        assert.match(server.log(), /the write lease holder sent nothing for \d+ s/);

        const dataC = randomBytes(2 * MiB);
        await nbdWrite(c.uri, MiB, dataC, dir); // over A's second MiB, and one MiB more
        expected.set(dataC, MiB);
        assertSameBytes(await nbdRead(c.uri, 0, 4 * MiB, dir), expected, "read through C");

        // A comes back while C holds the lease: it was fenced. It says so, reads on, and
        // refuses writes instead of writing over C's data.
        Deno.kill(a.process.pid, "SIGCONT");
        assertSameBytes(await nbdRead(a.uri, 0, 4 * MiB, dir), expected, "read through A");
        const triedA = await toolOk("nbdsh", ["-u", a.uri, "-c", nbdshTryWrite(3 * MiB)]);
        assert.equal(triedA.trim(), "EPERM", "a write through A after it lost the lease");
        assert.match(a.log(), /gave the write lease to another client/);
        assert.match(a.log(), /only reads from now on; restart it to write again/);
        await stopClean(c, "attach C");
      } finally {
        Deno.kill(a.process.pid, "SIGCONT");
      }
      await a.stop("SIGTERM"); // it exits; what it says on the way out is not checked here

      await stopClean(server, "the export");
      assertSameBytes(
        await Deno.readFile(`${dir}/disk.img`),
        expected,
        "the image: A's data where only A wrote, C's where C wrote, nothing of B",
      );
    }),
});

Deno.test({
  name: "a killed writer frees the lease at once",
  ignore: missing("nbdsh"),
  fn: () =>
    scenario("dst-lease-kill-", async (dir, track) => {
      const server = track(await exportImage(dir, "disk.img", "4M"));
      const target = memberName(server.address);
      const a = track(await startAttach([target, "--socket", `${dir}/a.sock`]));
      const dataA = randomBytes(MiB);
      await nbdWrite(a.uri, 0, dataA, dir);
      const holderA = await holderOf(server.address);
      assert.ok(await ownsConnection(a.process.pid, holderA.peer));

      await a.stop("SIGKILL");
      const c = track(
        await whenLeaseFrees(
          "writer attach C after A was killed",
          performance.now(),
          CLOSED_HOLDER_REPLACED_MS,
          () => attachWriter(target, `${dir}/c.sock`),
        ),
      );
      const holderC = await holderOf(server.address);
      assert.notEqual(holderC.clientId, holderA.clientId);
      const dataC = randomBytes(MiB);
      await nbdWrite(c.uri, 2 * MiB, dataC, dir);
      await stopClean(c, "attach C");

      await stopClean(server, "the export");
      const image = await Deno.readFile(`${dir}/disk.img`);
      assertSameBytes(image.subarray(0, MiB), dataA, "A's write, acknowledged before the kill");
      assertSameBytes(image.subarray(MiB, 2 * MiB), new Uint8Array(MiB), "untouched");
      assertSameBytes(image.subarray(2 * MiB, 3 * MiB), dataC, "C's write");
    }),
});

Deno.test({
  name: "--shared-writers lets two writers write",
  ignore: missing("nbdsh"),
  fn: () =>
    scenario("dst-lease-shared-", async (dir, track) => {
      const server = track(await exportImage(dir, "disk.img", "4M", "--shared-writers"));
      const target = memberName(server.address);
      const a = track(await startAttach([target, "--socket", `${dir}/a.sock`]));
      const b = track(await startAttach([target, "--socket", `${dir}/b.sock`]));
      const status = await statusOf(server.address);
      assert.equal(status.sharedWriters, true);
      assert.equal(status.writeLease, null, "nobody holds a lease with shared writers");

      const expected = new Uint8Array(4 * MiB);
      const writes: Array<[RunningAttach, number]> = [[a, 0], [b, MiB], [a, 2 * MiB], [b, 3 * MiB]];
      for (const [attach, offset] of writes) {
        const data = randomBytes(MiB);
        await nbdWrite(attach.uri, offset, data, dir);
        expected.set(data, offset);
      }
      await stopClean(a, "attach A");
      await stopClean(b, "attach B");
      await stopClean(server, "the export");
      assertSameBytes(await Deno.readFile(`${dir}/disk.img`), expected, "the image holds both");
    }),
});

/**
 * Runs `body` while an NBD client (nbdsh) of `uri` that has written `data` at `offset`
 * keeps its connection open; then it disconnects (its stdin closes) and must exit 0.
 */
async function withNbdWriterHolding(
  uri: string,
  offset: number,
  data: Uint8Array,
  dir: string,
  body: () => Promise<void>,
): Promise<void> {
  const path = await Deno.makeTempFile({ dir, prefix: "nbd-holding-" });
  await Deno.writeFile(path, data);
  const script = `
import sys
h.pwrite(open(${JSON.stringify(path)}, "rb").read(), ${offset})
print("written", flush=True)
sys.stdin.read()
`;
  const nbdsh = new Deno.Command("nbdsh", {
    args: ["-u", uri, "-c", script],
    // As tools.ts: nbdsh must find the python3 that has Debian's libnbd module first.
    env: { PATH: `/usr/bin:/usr/sbin:/sbin:/bin:${Deno.env.get("PATH") ?? ""}` },
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(nbdsh.stderr).text();
  const written = Promise.withResolvers<void>();
  const stdout = (async () => {
    let text = "";
    for await (const chunk of nbdsh.stdout.pipeThrough(new TextDecoderStream())) {
      text += chunk;
      if (text.includes("written")) written.resolve();
    }
    written.reject(new Error(`nbdsh ended before it had written: ${text}${await stderr}`));
    return text;
  })();
  try {
    await written.promise;
    await body();
  } finally {
    await nbdsh.stdin.close(); // the NBD client disconnects
    const status = await nbdsh.status;
    const [out, err] = await Promise.all([stdout, stderr]);
    assert.equal(status.code, 0, `nbdsh exited ${status.code}: ${out}${err}`);
  }
}

Deno.test({
  name: "the export's NBD port is one writer",
  ignore: missing("nbdsh"),
  fn: () =>
    scenario("dst-lease-nbd-", async (dir, track) => {
      const server = track(await exportImage(dir, "disk.img", "4M", "--nbd", "127.0.0.1:0"));
      assert.ok(server.nbdUri !== null);
      const expected = new Uint8Array(4 * MiB);

      // An NBD client writes and keeps its connection open.
      const dataN = randomBytes(MiB);
      expected.set(dataN, 0);
      await withNbdWriterHolding(server.nbdUri, 0, dataN, dir, async () => {
        const holderN = await holderOf(server.address);
        assert.equal(holderN.clientId, "the export's NBD port");
        assert.match(holderN.peer, /^NBD clients of 127\.0\.0\.1:\d+$/);

        await assert.rejects(
          RemoteDevice.connect(server.address, { log: quiet, retries: 0 }),
          (error: unknown) => {
            assert.ok(error instanceof HandshakeRefused, String(error));
            assert.equal(error.code, "WRITE_LEASE_HELD");
            assert.match(error.message, /the write lease is held by NBD clients of 127\.0\.0\.1/);
            return true;
          },
        );
        // A reader is let in, and sees the NBD client's data.
        const reader = await RemoteDevice.connect(server.address, { log: quiet, writer: false });
        const seen = new Uint8Array(MiB);
        await reader.read(0, seen);
        await reader.close();
        assertSameBytes(seen, dataN, "the NBD client's write read over DST");
      });

      const writer = await whenLeaseFrees(
        "a DST writer after the NBD client disconnected",
        performance.now(),
        CLOSED_HOLDER_REPLACED_MS,
        () => connectWriter(server.address),
      );
      try {
        const dataD = randomBytes(MiB);
        await writer.write(2 * MiB, dataD);
        await writer.flush();
        expected.set(dataD, 2 * MiB);
        assert.notEqual((await holderOf(server.address)).clientId, "the export's NBD port");

        // And the other way round: while the DST writer holds the lease, NBD writes are refused.
        const tried = await toolOk("nbdsh", ["-u", server.nbdUri, "-c", nbdshTryWrite(3 * MiB)]);
        assert.equal(tried.trim(), "EPERM", "an NBD write while a DST client holds the lease");
      } finally {
        await writer.close();
      }

      await stopClean(server, "the export");
      assertSameBytes(await Deno.readFile(`${dir}/disk.img`), expected, "the image");
    }),
});

Deno.test({
  name: "the NBD port as lease holder is named by the port it listens on",
  ignore: missing("nbdsh"),
  fn: () =>
    scenario("dst-lease-nbd-name-", async (dir, track) => {
      const server = track(await exportImage(dir, "disk.img", "4M", "--nbd", "127.0.0.1:0"));
      const port = new URL(server.nbdUri!).port;
      await withNbdWriterHolding(server.nbdUri!, 0, randomBytes(4096), dir, async () => {
        const named = `NBD clients of 127.0.0.1:${port}`;
        assert.equal((await holderOf(server.address)).peer, named);
        await assert.rejects(
          RemoteDevice.connect(server.address, { log: quiet, retries: 0 }),
          (error: unknown) => error instanceof Error && error.message.includes(named),
        );
      });
    }),
});

/** An export's log line when a client's new connection fences its older ones. */
const FENCING = /reconnected; fencing its \d+ older connection\(s\) first/g;

Deno.test("a restarted mirror takes its lease back at once; a mirror with another identity is refused", async () => {
  await scenario("dst-lease-mirror-", async (dir, track) => {
    const legExports = [
      track(await exportImage(dir, "a.img", "8M")),
      track(await exportImage(dir, "b.img", "8M")),
    ];
    const legs = legExports.map((leg) => memberName(leg.address));
    const state = `${dir}/state`;
    const expected = new Uint8Array(8 * MiB);

    /** Writes random data at `offset` through the mirror served at `address`, and flushes. */
    const writeThrough = async (address: HostPort, offset: number, length: number) => {
      const client = await RemoteDevice.connect(address, { log: quiet });
      try {
        const data = randomBytes(length);
        await client.write(offset, data);
        await client.flush();
        expected.set(data, offset);
      } finally {
        await client.close();
      }
    };
    const readBack = async (address: HostPort, what: string) => {
      const client = await RemoteDevice.connect(address, { log: quiet, writer: false });
      try {
        const back = new Uint8Array(8 * MiB);
        await client.read(0, back);
        assertSameBytes(back, expected, what);
      } finally {
        await client.close();
      }
    };
    /** Both legs' exports show the mirror's identity, from its state folder, as their holder. */
    const legsHeldByMirror = async () => {
      const clientId = (await Deno.readTextFile(`${state}/client-id`)).trim();
      for (const leg of legExports) {
        assert.equal(
          (await holderOf(leg.address)).clientId,
          clientId,
          "the mirror holds the lease",
        );
      }
    };

    const first = track(await startNewMirror(legs, state));
    await waitForMirror(first.address);
    await legsHeldByMirror();
    await writeThrough(first.address, 0, 3 * MiB);

    // kill -9 and the same command again (without --source now, which would start
    // over), at once: the same identity takes its lease back.
    await first.stop("SIGKILL");
    const second = track(
      await startArray(["mirror", ...legs, "--state", state, "--export", "127.0.0.1:0"]),
    );
    await readBack(second.address, "the mirror after a kill -9 and restart");
    await writeThrough(second.address, 3 * MiB, 2 * MiB);
    await waitForMirror(second.address);
    await legsHeldByMirror();

    // Another mirror (another state folder, so another identity) over the same legs: refused.
    const generations = await Promise.all(
      legExports.map(async (leg) => (await statusOf(leg.address)).writeGeneration),
    );
    const other = await runDst([
      "array",
      "mirror",
      ...legs,
      "--source",
      legs[0]!,
      "--state",
      `${dir}/other-state`,
      "--export",
      "127.0.0.1:0",
    ]);
    assert.notEqual(other.code, 0, `a second mirror of the same legs started:\n${other.stdout}`);
    assert.doesNotMatch(other.stdout, /serving/);
    assert.match(other.stderr, /the write lease is held by 127\.0\.0\.1:\d+ \(client [0-9a-f]{8}/);
    assert.match(other.stderr, /a mirror never shares a leg with another writer/);
    await legsHeldByMirror();
    assert.deepEqual(
      await Promise.all(
        legExports.map(async (leg) => (await statusOf(leg.address)).writeGeneration),
      ),
      generations,
      "the refused mirror started no write generation on the legs",
    );
    await readBack(second.address, "the mirror after another was refused");

    // The running mirror is frozen with its connections open. Its state folder stays
    // locked to it; a copy of that state (the same identity, as when a mirror's node is
    // replaced from a backup of its state) reopens at once and fences the frozen
    // mirror's connections instead of waiting 30 s for them to go silent.
    const fencings = () => legExports.map((leg) => leg.log().match(FENCING)?.length ?? 0);
    const fencedBefore = fencings();
    Deno.kill(second.process.pid, "SIGSTOP");
    const locked = await runDst([
      "array",
      "mirror",
      ...legs,
      "--state",
      state,
      "--export",
      "127.0.0.1:0",
    ]);
    assert.notEqual(locked.code, 0);
    assert.match(
      locked.stderr,
      new RegExp(`in use by another dst array \\(process ${second.process.pid}\\)`),
    );
    const copy = `${dir}/state-copy`;
    await Deno.mkdir(copy);
    for (const name of ["state.json", "bitmap", "client-id"]) {
      await Deno.copyFile(`${state}/${name}`, `${copy}/${name}`);
    }
    const third = track(
      await startArray(["mirror", ...legs, "--state", copy, "--export", "127.0.0.1:0"]),
    );
    await second.stop("SIGKILL");
    fencings().forEach((count, i) => {
      assert.equal(count, fencedBefore[i]! + 1, `leg ${i} fenced the frozen mirror's connection`);
    });
    await readBack(third.address, "the mirror reopened beside its frozen self");
    await writeThrough(third.address, 5 * MiB, MiB);
    await waitForMirror(third.address);
    await legsHeldByMirror();
    await readBack(third.address, "the mirror at the end");

    await stopClean(third, "the mirror");
    await Promise.all(legExports.map((leg, i) => stopClean(leg, `leg export ${i}`)));
    for (const name of ["a.img", "b.img"]) {
      assertSameBytes(await Deno.readFile(`${dir}/${name}`), expected, name);
    }
  });
});
