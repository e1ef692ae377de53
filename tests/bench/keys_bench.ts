/**
 * What keys cost: the DST client (the engine of `dst attach`) against three `dst
 * export` processes on loopback, one plain, one `--key --protect encrypt`, one
 * `--key --protect mac`, each on an image in /dev/shm. Every keyed figure is paired
 * with the plain one in the same run, alternating which goes first (alternate.ts):
 * 1 MiB sequential writes and reads (8 in flight), 4 KiB random writes and reads
 * (32 in flight). Then the encrypted export's peak RSS while 64 keyed clients, from
 * four loopback addresses, each keep 32 random 4 KiB requests in flight.
 */

import { RemoteDevice } from "../../src/client/remote_device.ts";
import { type Key, loadKeyFile } from "../../src/lib/key_file.ts";
import { silentLogger } from "../../src/lib/log.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { runDst, startExport } from "../helpers/spawn.ts";
import { alternating } from "./alternate.ts";
import { pipeline } from "./pipeline.ts";
import { dialFrom } from "./source_dialer.ts";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 256 * MiB;
const SEQ_DEPTH = 8;
const RANDOM_DEPTH = 32;
const RANDOM_SECONDS = 2;
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

type Load = (device: RemoteDevice) => Promise<number>;

function sequential(write: boolean): Load {
  const big = randomBytes(MiB);
  return async (device) => {
    const buffers = Array.from({ length: SEQ_DEPTH }, () => new Uint8Array(MiB));
    let at = 0;
    let slot = 0;
    const started = performance.now();
    const ops = await pipeline(SEQ_DEPTH, () => {
      if (at >= IMAGE_BYTES) return null;
      const offset = at;
      at += MiB;
      slot = (slot + 1) % SEQ_DEPTH;
      return write ? device.write(offset, big) : device.read(offset, buffers[slot]!);
    });
    return ops / ((performance.now() - started) / 1000);
  };
}

function random(write: boolean, seconds = RANDOM_SECONDS): Load {
  const smalls = Array.from({ length: RANDOM_DEPTH }, () => randomBytes(4096));
  return async (device) => {
    const blocks = IMAGE_BYTES / 4096;
    const until = performance.now() + seconds * 1000;
    let slot = 0;
    const started = performance.now();
    const ops = await pipeline(RANDOM_DEPTH, () => {
      if (performance.now() >= until) return null;
      const offset = Math.floor(Math.random() * blocks) * 4096;
      slot = (slot + 1) % RANDOM_DEPTH;
      return write ? device.write(offset, smalls[slot]!) : device.read(offset, smalls[slot]!);
    });
    return ops / ((performance.now() - started) / 1000);
  };
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

export async function benchKeys(): Promise<KeysBench> {
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "dst-bench-keys-" });
  const keyFile = `${dir}/bench.keys`;
  const made = await runDst(["keygen", keyFile, "--name", "bench"]);
  if (made.code !== 0) throw new Error(made.stderr);
  const key: Key = (await loadKeyFile(keyFile)).keys[0]!;
  const start = (name: string, ...extra: string[]) =>
    startExport([
      `${dir}/${name}.img`,
      "--create",
      String(IMAGE_BYTES),
      "--listen",
      "127.0.0.1:0",
      ...extra,
    ]);
  const servers = {
    plain: await start("plain"),
    encrypt: await start("encrypt", "--key", keyFile, "--protect", "encrypt"),
    mac: await start("mac", "--key", keyFile, "--protect", "mac"),
  };
  const devices = {
    plain: await RemoteDevice.connect(servers.plain.address, { log: silentLogger }),
    encrypt: await RemoteDevice.connect(servers.encrypt.address, { key, log: silentLogger }),
    mac: await RemoteDevice.connect(servers.mac.address, { key, log: silentLogger }),
  };
  const rows: KeysRow[] = [];
  try {
    // Lay out every image, so reads hit written pages.
    for (const device of Object.values(devices)) await sequential(true)(device);
    const loads: Array<[string, string, Load]> = [
      ["sequential write, 1 MiB, 8 in flight", "MiB/s", sequential(true)],
      ["sequential read, 1 MiB, 8 in flight", "MiB/s", sequential(false)],
      ["random write, 4 KiB, 32 in flight", "IOPS", random(true)],
      ["random read, 4 KiB, 32 in flight", "IOPS", random(false)],
    ];
    for (const [name, unit, load] of loads) {
      const encrypt = await alternating(
        RUNS,
        () => load(devices.encrypt),
        () => load(devices.plain),
      );
      const mac = await alternating(RUNS, () => load(devices.mac), () => load(devices.plain));
      rows.push({
        name,
        unit,
        plain: (encrypt.b + mac.b) / 2,
        encrypt: encrypt.a,
        mac: mac.a,
      });
    }
    for (const device of Object.values(devices)) await device.close();

    // Memory: 64 keyed clients on the encrypted export, 16 per source address.
    const pid = servers.encrypt.process.pid;
    const rssBeforeBytes = await currentRss(pid);
    const clients = await Promise.all(
      Array.from({ length: RSS_CLIENTS }, (_, i) =>
        RemoteDevice.connect(servers.encrypt.address, {
          key,
          log: silentLogger,
          dial: dialFrom(`127.0.0.${2 + Math.floor(i / 16)}`),
          writer: false,
        })),
    );
    let rssOps = 0;
    try {
      const reads = random(false, RSS_SECONDS);
      const perSecond = await Promise.all(clients.map((client) => reads(client)));
      rssOps = perSecond.reduce((sum, rate) => sum + rate, 0) * RSS_SECONDS;
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
    await Promise.all(Object.values(servers).map((server) => server.stop()));
    await Deno.remove(dir, { recursive: true });
  }
}

export function printKeysBench(bench: KeysBench): void {
  console.log(
    `\nDST bench: keys. The DST client (dst attach's engine) -> dst export on loopback, image in ` +
      `/dev/shm; each keyed figure paired with plain in the same run, alternating, median of ${RUNS}`,
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
