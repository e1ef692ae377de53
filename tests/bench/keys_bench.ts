/**
 * What keys cost, measured as the issue asks: `dst attach` -> `dst export` on loopback,
 * images in /dev/shm, three chains in one run: plain, `--key --protect encrypt` and
 * `--key --protect mac` (the attach proving the key). nbdcopy writes and reads the
 * whole image (sequential; nbdcopy's own request sizes), fio's nbd engine does 4 KiB
 * random writes and reads at 32 in flight. Every keyed figure is paired with the
 * plain chain's in the same run, alternating which goes first (alternate.ts). Then
 * the encrypted export's peak RSS while 64 keyed clients (the DST client, from four
 * loopback addresses) each keep 32 random 4 KiB reads in flight.
 */

import { RemoteDevice } from "../../src/client/remote_device.ts";
import { type Key, loadKeyFile } from "../../src/lib/key_file.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { runDst, startAttach, startExport } from "../helpers/spawn.ts";
import { missing } from "../helpers/tools.ts";
import { alternating } from "./alternate.ts";
import { fio, nbdcopy } from "./nbd_peers.ts";
import { pipeline } from "./pipeline.ts";
import { dialFrom } from "./source_dialer.ts";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 512 * MiB;
const RANDOM_DEPTH = 32;
const FIO_SECONDS = 3;
const RUNS = 3;
const RSS_CLIENTS = 64;
const RSS_SECONDS = 5;

export interface KeysRow {
  name: string;
  unit: string;
  plain: number;
  encrypt: number;
  mac: number;
}

export interface KeysBench {
  rows: KeysRow[];
  rssBeforeBytes: number;
  rssPeakBytes: number;
  rssClients: number;
  rssOps: number;
}

interface Chain {
  uri: string;
  stop(): Promise<void>;
}

async function chain(
  dir: string,
  name: string,
  keyArgs: string[],
  attachKey: string[],
): Promise<Chain> {
  const server = await startExport([
    `${dir}/${name}.img`,
    "--create",
    String(IMAGE_BYTES),
    "--listen",
    "127.0.0.1:0",
    ...keyArgs,
  ]);
  const attach = await startAttach([
    `127.0.0.1:${server.address.port}`,
    "--listen",
    "127.0.0.1:0",
    ...attachKey,
  ]);
  return {
    uri: attach.uri,
    stop: async () => {
      await attach.stop();
      await server.stop();
    },
  };
}

function randomReads(device: RemoteDevice, seconds: number): Promise<number> {
  const smalls = Array.from({ length: RANDOM_DEPTH }, () => new Uint8Array(4096));
  const blocks = IMAGE_BYTES / 4096;
  const until = performance.now() + seconds * 1000;
  let slot = 0;
  return pipeline(RANDOM_DEPTH, () => {
    if (performance.now() >= until) return null;
    slot = (slot + 1) % RANDOM_DEPTH;
    return device.read(Math.floor(Math.random() * blocks) * 4096, smalls[slot]!);
  });
}

/** The peak resident set of process `pid` (VmHWM), in bytes. */
async function peakRss(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

async function currentRss(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

export async function benchKeys(): Promise<KeysBench | null> {
  if (missing("nbdcopy", "fio")) {
    console.log("keys bench skipped: nbdcopy and fio are needed (bash .ci/run installs them)");
    return null;
  }
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "dst-bench-keys-" });
  const keyFile = `${dir}/bench.keys`;
  const made = await runDst(["keygen", keyFile, "--name", "bench"]);
  if (made.code !== 0) throw new Error(made.stderr);
  const key: Key = (await loadKeyFile(keyFile)).keys[0]!;
  const withKey = ["--key", keyFile];
  const chains = {
    plain: await chain(dir, "plain", [], []),
    encrypt: await chain(dir, "encrypt", [...withKey, "--protect", "encrypt"], withKey),
    mac: await chain(dir, "mac", [...withKey, "--protect", "mac"], withKey),
  };
  const source = `${dir}/source.bin`;
  const rows: KeysRow[] = [];
  let stopRss = () => Promise.resolve();
  try {
    const file = await Deno.open(source, { write: true, create: true });
    for (let at = 0; at < IMAGE_BYTES; at += MiB) await file.write(randomBytes(MiB));
    file.close();
    // Lay out every image, so reads hit written pages.
    for (const c of Object.values(chains)) await nbdcopy(source, c.uri, IMAGE_BYTES);
    const loads: Array<[string, string, (uri: string) => Promise<number>]> = [
      ["sequential write, nbdcopy", "MiB/s", (uri) => nbdcopy(source, uri, IMAGE_BYTES)],
      ["sequential read, nbdcopy", "MiB/s", (uri) => nbdcopy(uri, "null:", IMAGE_BYTES)],
      [
        "random write, 4 KiB, 32 in flight, fio",
        "IOPS",
        (uri) => fio(uri, "randwrite", RANDOM_DEPTH, FIO_SECONDS, IMAGE_BYTES),
      ],
      [
        "random read, 4 KiB, 32 in flight, fio",
        "IOPS",
        (uri) => fio(uri, "randread", RANDOM_DEPTH, FIO_SECONDS, IMAGE_BYTES),
      ],
    ];
    for (const [name, unit, load] of loads) {
      const encrypt = await alternating(
        RUNS,
        () => load(chains.encrypt.uri),
        () => load(chains.plain.uri),
      );
      const mac = await alternating(RUNS, () => load(chains.mac.uri), () => load(chains.plain.uri));
      rows.push({ name, unit, plain: (encrypt.b + mac.b) / 2, encrypt: encrypt.a, mac: mac.a });
    }

    // Memory: 64 keyed clients on an encrypted export of their own, 16 per source address.
    await Promise.all(Object.values(chains).map((c) => c.stop()));
    const server = await startExport([`${dir}/encrypt.img`, "--listen", "127.0.0.1:0", ...withKey]);
    stopRss = () => server.stop().then(() => {});
    const pid = server.process.pid;
    const rssBeforeBytes = await currentRss(pid);
    const clients = await Promise.all(
      Array.from(
        { length: RSS_CLIENTS },
        (_, i) =>
          RemoteDevice.connect(server.address, {
            key,
            log: silentLogger,
            dial: dialFrom(`127.0.0.${2 + Math.floor(i / 16)}`),
            writer: false,
          }),
      ),
    );
    let rssOps = 0;
    try {
      const counts = await Promise.all(clients.map((client) => randomReads(client, RSS_SECONDS)));
      rssOps = counts.reduce((sum, n) => sum + n, 0);
    } finally {
      await Promise.all(clients.map((client) => client.close()));
    }
    return {
      rows,
      rssBeforeBytes,
      rssPeakBytes: await peakRss(pid),
      rssClients: RSS_CLIENTS,
      rssOps,
    };
  } finally {
    await Promise.all(Object.values(chains).map((c) => c.stop()));
    await stopRss();
    await Deno.remove(dir, { recursive: true });
  }
}

export function printKeysBench(bench: KeysBench | null): void {
  if (bench === null) return;
  console.log(
    `\nDST bench: keys. dst attach -> dst export on loopback, ${IMAGE_BYTES / MiB} MiB images in ` +
      `/dev/shm; each keyed figure paired with plain in the same run, alternating, median of ` +
      `${RUNS} (fio: ${FIO_SECONDS} s)`,
  );
  console.log("");
  console.log("| measurement | plain | encrypt | ratio | mac | ratio |");
  console.log("|---|--:|--:|--:|--:|--:|");
  const n = (value: number) => Math.round(value).toLocaleString("en");
  for (const row of bench.rows) {
    console.log(
      `| ${row.name} | ${n(row.plain)} ${row.unit} | ${n(row.encrypt)} ${row.unit} | ${
        (row.encrypt / row.plain).toFixed(2)
      }x | ${n(row.mac)} ${row.unit} | ${(row.mac / row.plain).toFixed(2)}x |`,
    );
  }
  console.log(
    `\nThe encrypted export's memory with ${bench.rssClients} keyed clients, each with ` +
      `${RANDOM_DEPTH} random 4 KiB reads in flight for ${RSS_SECONDS} s ` +
      `(${n(bench.rssOps)} reads): RSS ${(bench.rssBeforeBytes / MiB).toFixed(0)} MiB before, ` +
      `peak ${(bench.rssPeakBytes / MiB).toFixed(0)} MiB.`,
  );
}
