/**
 * The NBD part of `deno task bench`: DST against nbdkit, side by side in one run, with
 * the same clients. nbdcopy for sequential (1 GiB, median of 3), fio's nbd engine for
 * 4 KiB random at 32 and at 1 in flight (3 s each). Every image is written once
 * before timing: the first write into a sparse tmpfs file measures page allocation
 * (3-4 s per GiB here, for nbdkit and DST alike), not the server. Two pairings:
 *
 *   1. `dst export --nbd` vs nbdkit's file plugin, on images in /dev/shm;
 *   2. `dst attach` -> `dst export` vs nbdkit's nbd plugin -> nbdkit's file plugin
 *      (the same two hops).
 *
 * A peer that is not installed is skipped with a line saying so.
 */

import { randomBytes } from "../helpers/random_bytes.ts";
import { newDisk, startAttach, startExport } from "../helpers/spawn.ts";
import { missing, spawnTool, tool, toolOk } from "../helpers/tools.ts";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 1024 * MiB;
const FIO_SECONDS = 3;

export interface PeerRow {
  measurement: string;
  unit: string;
  dst: number;
  nbdkit: number;
}

interface Target {
  uri: string;
  stop(): Promise<void>;
}

/** Runs both pairings; returns their rows (empty when a peer is missing, with the reason printed). */
export async function benchNbdPeers(): Promise<{ title: string; rows: PeerRow[] }[]> {
  if (missing("nbdkit", "nbdcopy", "fio")) {
    console.log(
      "NBD comparison skipped: nbdkit, nbdcopy and fio are needed (bash .ci/run installs them)",
    );
    return [];
  }
  const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "dst-bench-nbd-" });
  try {
    const source = `${dir}/source.bin`;
    const block = randomBytes(MiB);
    const file = await Deno.open(source, { write: true, create: true });
    for (let i = 0; i < IMAGE_BYTES / MiB; i++) await file.write(block);
    file.close();

    const oneHop = await compare(source, () => dstExportNbd(dir), () => nbdkitFile(dir));
    const twoHops = await compare(source, () => dstAttachChain(dir), () => nbdkitChain(dir));
    return [
      { title: "`dst export --nbd` vs nbdkit file plugin", rows: oneHop },
      {
        title: "`dst attach` -> `dst export` vs nbdkit nbd plugin -> nbdkit file plugin",
        rows: twoHops,
      },
    ];
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function compare(
  source: string,
  dst: () => Promise<Target>,
  nbdkit: () => Promise<Target>,
): Promise<PeerRow[]> {
  const a = await measureAll(source, dst);
  const b = await measureAll(source, nbdkit);
  return a.map(([measurement, unit, value], i) => ({
    measurement,
    unit,
    dst: value,
    nbdkit: b[i]![2],
  }));
}

async function measureAll(
  source: string,
  start: () => Promise<Target>,
): Promise<Array<[string, string, number]>> {
  const target = await start();
  try {
    await nbdcopy(source, target.uri); // lay out the image's pages
    return [
      [
        "sequential write 1 GiB, nbdcopy",
        "MiB/s",
        await median3(() => nbdcopy(source, target.uri)),
      ],
      [
        "sequential read 1 GiB, nbdcopy",
        "MiB/s",
        await median3(() => nbdcopy(target.uri, "null:")),
      ],
      ["4 KiB random read, 32 in flight, fio", "IOPS", await fio(target.uri, "randread", 32)],
      ["4 KiB random write, 32 in flight, fio", "IOPS", await fio(target.uri, "randwrite", 32)],
      ["4 KiB random read, 1 in flight, fio", "IOPS", await fio(target.uri, "randread", 1)],
    ];
  } finally {
    await target.stop();
  }
}

async function median3(measure: () => Promise<number>): Promise<number> {
  const values = [await measure(), await measure(), await measure()];
  return values.sort((a, b) => a - b)[1]!;
}

async function nbdcopy(from: string, to: string): Promise<number> {
  const started = performance.now();
  await toolOk("nbdcopy", [from, to]);
  return IMAGE_BYTES / MiB / ((performance.now() - started) / 1000);
}

async function fio(uri: string, rw: string, depth: number): Promise<number> {
  const out = await toolOk("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${rw}`,
    "--bs=4k",
    `--iodepth=${depth}`,
    `--runtime=${FIO_SECONDS}`,
    "--time_based",
    `--size=${IMAGE_BYTES}`,
    "--output-format=json",
  ]);
  const job = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  return job.read.iops + job.write.iops;
}

async function dstExportNbd(dir: string): Promise<Target> {
  const server = await startExport([...newDisk(String(IMAGE_BYTES))(dir), "--nbd", "127.0.0.1:0"]);
  return { uri: server.nbdUri!, stop: async () => void (await server.stop()) };
}

async function dstAttachChain(dir: string): Promise<Target> {
  const server = await startExport([
    `${dir}/chain.img`,
    "--create",
    String(IMAGE_BYTES),
    "--listen",
    "127.0.0.1:0",
  ]);
  const attach = await startAttach([`127.0.0.1:${server.address.port}`, "--listen", "127.0.0.1:0"]);
  return {
    uri: attach.uri,
    stop: async () => {
      await attach.stop();
      await server.stop();
    },
  };
}

async function nbdkitFile(dir: string): Promise<Target> {
  const image = `${dir}/nbdkit.img`;
  await toolOk("truncate", ["-s", String(IMAGE_BYTES), image]);
  return await nbdkit(["file", `file=${image}`]);
}

async function nbdkitChain(dir: string): Promise<Target> {
  const backend = await nbdkitFile(dir);
  const front = await nbdkit(["nbd", `uri=${backend.uri}`]);
  return {
    uri: front.uri,
    stop: async () => {
      await front.stop();
      await backend.stop();
    },
  };
}

/** Starts nbdkit on a free loopback port and waits until it answers. */
async function nbdkit(plugin: string[]): Promise<Target> {
  const port = freePort();
  const child = spawnTool("nbdkit", [
    "-f",
    "--exit-with-parent",
    "-i",
    "127.0.0.1",
    "-p",
    String(port),
    ...plugin,
  ]);
  const uri = `nbd://127.0.0.1:${port}`;
  for (let i = 0; (await tool("nbdinfo", ["--size", uri])).code !== 0; i++) {
    if (i > 100) throw new Error(`nbdkit ${plugin.join(" ")} did not start`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return {
    uri,
    stop: async () => {
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}
