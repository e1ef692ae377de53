/**
 * A five-host tree on one machine: five network namespaces (hosts a to e, 10.55.0.1 to
 * 10.55.0.5) joined by a bridge in a sixth (the hub), every link shaped to 200 Mbit/s
 * each way. `dst up HOST.yaml` runs in each: b, c, d and e export one image each; a
 * runs a linear array of b+c, another of d+e, a mirror of the two, and an attach of
 * the mirror as NBD on its loopback.
 *
 * Then it writes random data through NBD and reads it back, cuts e off (its link
 * down), writes new data (the mirror goes on with the b+c leg alone), brings e back,
 * waits until `dst status --json` shows every leg of the mirror in sync, and checks
 * the data three ways: read back through NBD, b.img+c.img, and d.img+e.img. It prints
 * each step, and removes the namespaces and stops every process even when a step
 * fails. This file owns the namespaces and the run; the hosts' files say what runs.
 *
 * Needs root, iproute2 (ip, tc) and nbdcopy, and the bundle:
 *
 *   deno task bundle && deno run -A examples/five-hosts/run.ts
 *
 * tests/integration/five_hosts_test.ts runs main() where namespaces can be made.
 */

import { DENO_RUN_ARGS } from "../../src/cli/self.ts";

const HERE = new URL(".", import.meta.url).pathname;
const MiB = 1024 * 1024;

/** Each host: its namespace, its address, its node file. */
const HOSTS = ["a", "b", "c", "d", "e"].map((name, i) => ({
  name,
  ns: `dst5-${name}`,
  /** The hub's end of its link; the host's end is its eth0. */
  hubVeth: `to-${name}`,
  ip: `10.55.0.${i + 1}`,
}));
const HUB = "dst5-hub";
const LINK_RATE = "200mbit";

/** The mirror's DST export and the attach's NBD address, both on a's loopback (a.yaml). */
const MIRROR = "127.0.0.1:1030";
/** The mirror's leg that is the linear array of d+e, the one that loses e. */
const LEG_DE = "127.0.0.1:1032";
const NBD = "nbd://127.0.0.1:10809";
/** Two linear arrays of two 8 MiB images: the mirror is 16 MiB. */
const MIRROR_BYTES = 16 * MiB;
const SYNC_TIMEOUT_MS = 120_000;

export interface FiveHostsOptions {
  /** The bundled CLI (dist/dst.js). */
  program: string;
  /** Where each host's folder (its images, state) goes; the caller removes it. */
  workDir: string;
  /** Where each step is reported. */
  print: (line: string) => void;
}

export interface FiveHostsResult {
  /** What NBD read back equalled what was written: before the cut, during it, after resync. */
  readBackBeforeCut: boolean;
  readBackDuringCut: boolean;
  readBackAfterResync: boolean;
  /** The mirror's leg of d+e was out of sync while e was cut off. */
  legOutDuringCut: boolean;
  /** b.img+c.img and d.img+e.img equal the data, after the resync and a clean stop. */
  legBCEqual: boolean;
  legDEEqual: boolean;
}

interface Node {
  name: string;
  child: Deno.ChildProcess;
  log: string[];
  /** Its line saying it runs ("dst up: running 4 items of ..."). */
  ready: string;
  /** Resolves when the process ends, with its exit code. */
  ended: Promise<number>;
}

export async function main(options: FiveHostsOptions): Promise<FiveHostsResult> {
  const { print, workDir } = options;
  const nodes: Node[] = [];
  try {
    await removeNetwork(); // what an interrupted run left
    print(`network: hub ${HUB} with a bridge; hosts ${
      HOSTS.map((h) => `${h.name}=${h.ip}`).join(
        " ",
      )
    }; each link ${LINK_RATE}/s both ways (tbf)`);
    await makeNetwork();

    // Exports first (b..e), then a, whose arrays need them.
    for (const host of [...HOSTS.slice(1), HOSTS[0]!]) {
      const node = await startUp(options.program, host, workDir);
      nodes.push(node);
      print(`${host.name} (${host.ip}): ${node.ready}`);
    }

    const first = await waitForLegs(options, (legs) => legs.every((l) => l.state === "in-sync"));
    print(`mirror ${MIRROR} on a: ${describe(first)}`);

    const before = randomBytes(MIRROR_BYTES);
    await writeThroughNbd(workDir, before);
    print(`wrote ${MIRROR_BYTES / MiB} MiB of random data through ${NBD} on a`);
    const readBackBeforeCut = equal(await readThroughNbd(workDir), before);
    print(`read it back through NBD: ${readBackBeforeCut ? "same" : "DIFFERENT"}`);

    const e = HOSTS[4]!;
    await ip(["-n", HUB, "link", "set", e.hubVeth, "down"]);
    print(`cut e off (${e.hubVeth} down in the hub)`);
    const during = randomBytes(MIRROR_BYTES);
    let started = performance.now();
    await writeThroughNbd(workDir, during);
    print(
      `wrote ${MIRROR_BYTES / MiB} MiB of new data through NBD while e was away (${
        seconds(performance.now() - started)
      })`,
    );
    const readBackDuringCut = equal(await readThroughNbd(workDir), during);
    print(`read it back through NBD: ${readBackDuringCut ? "same" : "DIFFERENT"}`);
    const cut = await mirrorLegs(options);
    print(`mirror: ${describe(cut)}`);
    const legOutDuringCut = cut.some((l) => l.name === LEG_DE && l.state !== "in-sync");

    await ip(["-n", HUB, "link", "set", e.hubVeth, "up"]);
    print("brought e back");
    started = performance.now();
    const synced = await waitForLegs(
      options,
      (legs) => legs.every((l) => l.state === "in-sync"),
      (legs) => print(`  mirror: ${describe(legs)}`),
    );
    print(
      `resync finished in ${seconds(performance.now() - started)}: ${describe(synced)}`,
    );
    const readBackAfterResync = equal(await readThroughNbd(workDir), during);
    print(`read back through NBD: ${readBackAfterResync ? "same" : "DIFFERENT"}`);

    await stopAll(nodes, print);
    const image = (name: string) => Deno.readFile(`${workDir}/${name}/${name}.img`);
    const legBCEqual = equal(concat(await image("b"), await image("c")), during);
    const legDEEqual = equal(concat(await image("d"), await image("e")), during);
    print(`b.img+c.img: ${legBCEqual ? "same" : "DIFFERENT"} as the data`);
    print(`d.img+e.img: ${legDEEqual ? "same" : "DIFFERENT"} as the data`);
    return {
      readBackBeforeCut,
      readBackDuringCut,
      readBackAfterResync,
      legOutDuringCut,
      legBCEqual,
      legDEEqual,
    };
  } catch (error) {
    for (const node of nodes) {
      print(`--- ${node.name}'s dst up said:\n${node.log.join("\n")}`);
    }
    throw error;
  } finally {
    for (const node of nodes) {
      try {
        node.child.kill("SIGKILL");
      } catch {
        // already ended
      }
      await node.ended;
    }
    await removeNetwork();
    print("removed the namespaces");
  }
}

// --- the network ---------------------------------------------------------------------

async function makeNetwork(): Promise<void> {
  const tbf = ["root", "tbf", "rate", LINK_RATE, "burst", "256kb", "latency", "50ms"];
  await ip(["netns", "add", HUB]);
  await ip(["-n", HUB, "link", "add", "br0", "type", "bridge"]);
  await ip(["-n", HUB, "link", "set", "br0", "up"]);
  for (const host of HOSTS) {
    await ip(["netns", "add", host.ns]);
    await ip([
      "-n",
      HUB,
      "link",
      "add",
      host.hubVeth,
      "type",
      "veth",
      "peer",
      "name",
      "eth0",
      "netns",
      host.ns,
    ]);
    await ip(["-n", HUB, "link", "set", host.hubVeth, "master", "br0", "up"]);
    await ip(["-n", host.ns, "addr", "add", `${host.ip}/24`, "dev", "eth0"]);
    await ip(["-n", host.ns, "link", "set", "eth0", "up"]);
    await ip(["-n", host.ns, "link", "set", "lo", "up"]);
    await ip(["netns", "exec", HUB, "tc", "qdisc", "add", "dev", host.hubVeth, ...tbf]);
    await ip(["netns", "exec", host.ns, "tc", "qdisc", "add", "dev", "eth0", ...tbf]);
  }
}

/** Deleting a namespace deletes its end of each veth, and with it the pair. Never throws. */
async function removeNetwork(): Promise<void> {
  for (const ns of [HUB, ...HOSTS.map((h) => h.ns)]) {
    await run("ip", ["netns", "del", ns]).catch(() => {});
  }
}

/**
 * Whether this machine can run the example, or why not: root, ip and tc, nbdcopy,
 * and a network namespace made and removed (a container may refuse it).
 */
export async function cannotRun(): Promise<string | null> {
  if (Deno.build.os !== "linux") return `not on Linux (${Deno.build.os})`;
  if (Deno.uid() !== 0) return "not running as root (network namespaces need it)";
  for (const command of ["ip", "tc", "nbdcopy"]) {
    const found = await run(command, ["--version"]).catch(() => null);
    if (found === null) return `${command} is not installed`;
  }
  const probe = "dst5-probe";
  const made = await run("ip", ["netns", "add", probe]);
  if (made.code !== 0) return `\`ip netns add\` failed: ${made.text.trim()}`;
  await run("ip", ["netns", "del", probe]);
  return null;
}

// --- the hosts ---------------------------------------------------------------------

/**
 * `dst up HOST.yaml` in the host's namespace. The file is copied into the host's own
 * folder first: a node file's relative paths (its image, the mirror's state) are the
 * file's folder's, so each host's land in its folder.
 */
async function startUp(
  program: string,
  host: { name: string; ns: string },
  workDir: string,
): Promise<Node> {
  const dir = `${workDir}/${host.name}`;
  await Deno.mkdir(dir, { recursive: true });
  await Deno.copyFile(`${HERE}${host.name}.yaml`, `${dir}/${host.name}.yaml`);
  const child = new Deno.Command("ip", {
    args: [
      "netns",
      "exec",
      host.ns,
      Deno.execPath(),
      ...DENO_RUN_ARGS,
      program,
      "up",
      `${dir}/${host.name}.yaml`,
    ],
    cwd: dir,
    env: { XDG_STATE_HOME: `${dir}/state` },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const log: string[] = [];
  const ended = child.status.then((status) => status.code);
  const started = Promise.race([
    collect(child.stdout, log, /^dst up: running \d+ items? of/),
    collect(child.stderr, log, null),
    ended.then((code): never => {
      throw new Error(`dst up on ${host.name} exited ${code}:\n${log.join("\n")}`);
    }),
  ]);
  const ready = await withTimeout(started, 30_000, `dst up on ${host.name} to start`);
  return { name: host.name, child, log, ready, ended };
}

/** Appends each line of `stream` to `log`; resolves with the first line matching `ready`. */
function collect(
  stream: ReadableStream<Uint8Array>,
  log: string[],
  ready: RegExp | null,
): Promise<string> {
  return new Promise((resolve) => {
    void (async () => {
      let buffered = "";
      for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
        buffered += chunk;
        let newline: number;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, newline);
          buffered = buffered.slice(newline + 1);
          log.push(line);
          if (ready?.test(line)) resolve(line);
        }
      }
    })().catch(() => {});
  });
}

/** SIGTERM to a first (its arrays hold the others' leases), then the rest; each must exit 0. */
async function stopAll(nodes: Node[], print: (line: string) => void): Promise<void> {
  for (const node of [...nodes].reverse()) {
    node.child.kill("SIGTERM");
    const code = await withTimeout(node.ended, 20_000, `dst up on ${node.name} to stop`);
    if (code !== 0) throw new Error(`dst up on ${node.name} exited ${code}`);
  }
  print("stopped dst up on a, e, d, c and b (SIGTERM, each exited 0)");
}

// --- the mirror and the data -------------------------------------------------------

interface Leg {
  name: string;
  state: string;
  dirtyRegions: number;
  resync?: { copiedRegions?: number; totalRegions?: number };
}

/** The mirror's legs, as `dst status --json` run on a prints them. */
async function mirrorLegs(options: FiveHostsOptions): Promise<Leg[]> {
  const status = await run("ip", [
    "netns",
    "exec",
    HOSTS[0]!.ns,
    Deno.execPath(),
    ...DENO_RUN_ARGS,
    options.program,
    "status",
    MIRROR,
    "--json",
  ]);
  if (status.code !== 0) {
    throw new Error(`dst status ${MIRROR} exited ${status.code}: ${status.text}`);
  }
  const rows = JSON.parse(status.text) as Array<{ status?: { array?: { members: Leg[] } } }>;
  const legs = rows[0]?.status?.array?.members;
  if (legs === undefined) throw new Error(`no mirror in dst status: ${status.text}`);
  return legs;
}

/** Asks `dst status` twice a second until `done(legs)`; `changed` sees each new picture. */
async function waitForLegs(
  options: FiveHostsOptions,
  done: (legs: Leg[]) => boolean,
  changed: (legs: Leg[]) => void = () => {},
): Promise<Leg[]> {
  const until = performance.now() + SYNC_TIMEOUT_MS;
  let shown = "";
  for (;;) {
    const legs = await mirrorLegs(options);
    if (done(legs)) return legs;
    const picture = describe(legs);
    if (picture !== shown) changed(legs);
    shown = picture;
    if (performance.now() > until) {
      throw new Error(`the mirror's legs did not get in sync in ${SYNC_TIMEOUT_MS} ms: ${picture}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

function describe(legs: Leg[]): string {
  return legs.map((l) => `${l.name} ${l.state}`).join(", ");
}

async function writeThroughNbd(workDir: string, data: Uint8Array): Promise<void> {
  await Deno.writeFile(`${workDir}/data.bin`, data);
  await onA("nbdcopy", ["--flush", `${workDir}/data.bin`, NBD]);
}

async function readThroughNbd(workDir: string): Promise<Uint8Array> {
  await onA("nbdcopy", [NBD, `${workDir}/read.bin`]);
  return await Deno.readFile(`${workDir}/read.bin`);
}

async function onA(command: string, args: string[]): Promise<void> {
  await ip(["netns", "exec", HOSTS[0]!.ns, command, ...args]);
}

// --- small things --------------------------------------------------------------------

async function ip(args: string[]): Promise<void> {
  const result = await run("ip", args);
  if (result.code !== 0) {
    throw new Error(`\`ip ${args.join(" ")}\` exited ${result.code}: ${result.text.trim()}`);
  }
}

/** Runs a command to its end: its exit code and its stdout then stderr. Throws if it is missing. */
async function run(command: string, args: string[]): Promise<{ code: number; text: string }> {
  const output = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    text: decoder.decode(output.stdout) + decoder.decode(output.stderr),
  };
}

async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function randomBytes(length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  // getRandomValues fills at most 65536 bytes a call.
  for (let at = 0; at < length; at += 65536) {
    crypto.getRandomValues(bytes.subarray(at, Math.min(length, at + 65536)));
  }
  return bytes;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const joined = new Uint8Array(a.length + b.length);
  joined.set(a);
  joined.set(b, a.length);
  return joined;
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

if (import.meta.main) {
  const program = new URL("../../dist/dst.js", import.meta.url).pathname;
  try {
    await Deno.stat(program);
  } catch {
    console.error(`${program} is missing: run \`deno task bundle\` first`);
    Deno.exit(1);
  }
  const why = await cannotRun();
  if (why !== null) {
    console.error(`Cannot run the five-host tree here: ${why}`);
    Deno.exit(77);
  }
  const workDir = await Deno.makeTempDir({ prefix: "dst-five-hosts-" });
  let ok = false;
  try {
    const result = await main({ program, workDir, print: (line) => console.log(line) });
    ok = Object.values(result).every((value) => value);
    console.log(ok ? "all checks passed" : `FAILED: ${JSON.stringify(result)}`);
  } finally {
    await Deno.remove(workDir, { recursive: true });
  }
  if (!ok) Deno.exit(1);
}
