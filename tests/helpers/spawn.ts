/**
 * Starting the real CLI (dist/dst.js, made by `deno task bundle`, and rebuilt first
 * when any source is newer: fresh_bundle.ts) as a child process, the way a user
 * would, with Deno.execPath(). Used by the integration
 * tests and the benchmark.
 */

import assert from "node:assert/strict";
import { type HostPort, parseHostPort } from "../../src/lib/address.ts";
import { DENO_RUN_ARGS } from "../../src/cli/self.ts";

import { BUNDLE, freshBundle } from "./fresh_bundle.ts";

export { BUNDLE, freshBundle };

/**
 * Spawned processes keep their state (write generations, mirror state) here, not in
 * the user's ~/.local/state: one folder per test process, removed at exit.
 */
export const TEST_STATE_HOME = Deno.makeTempDirSync({ prefix: "dst-test-state-" });
globalThis.addEventListener("unload", () => {
  try {
    Deno.removeSync(TEST_STATE_HOME, { recursive: true });
  } catch {
    // already gone
  }
});

/** A `dst` process that is serving: its startup line's match, its log, and a way to stop it. */
export interface RunningDst {
  process: Deno.ChildProcess;
  /** The match of the startup line's pattern. */
  ready: RegExpMatchArray;
  /** Everything the process wrote to stderr so far (its log). */
  log(): string;
  /** Sends `signal` (SIGTERM by default) once, and resolves with the exit status. */
  stop(signal?: Deno.Signal): Promise<Deno.CommandStatus>;
}

/** Stops `process` with SIGTERM and asserts it exited 0 (`what` names it in the failure). */
export async function stopClean(process: RunningDst, what: string): Promise<void> {
  const status = await process.stop("SIGTERM");
  assert.equal(status.code, 0, `${what} exited ${status.code}:\n${process.log()}`);
}

export interface RunningExport extends RunningDst {
  address: HostPort;
  /** With --nbd: the NBD URI it printed. */
  nbdUri: string | null;
}

export interface RunningAttach extends RunningDst {
  /** The NBD URI it printed. */
  uri: string;
}

/**
 * Spawns `dst export ARGS...` and waits for the line ending " on HOST:PORT" (and, with
 * --nbd, the NBD line). `env` adds to the environment.
 */
export async function startExport(
  args: string[],
  env: Record<string, string> = {},
): Promise<RunningExport> {
  const ready = args.includes("--nbd") ? / on (\S+)\n[^]*as NBD[^\n]* at (\S+)\n/ : / on (\S+)\n/;
  const running = await startDst(["export", ...args], ready, env);
  return {
    ...running,
    address: parseHostPort(running.ready[1]!, "127.0.0.1"),
    nbdUri: running.ready[2] ?? null,
  };
}

/** Spawns `dst attach ARGS...` and waits for the line ending " at NBD-URI". */
export async function startAttach(args: string[]): Promise<RunningAttach> {
  const running = await startDst(["attach", ...args], / at (nbd\S+)\n/);
  return { ...running, uri: running.ready[1]! };
}

/** Spawns `dst ARGS...` and waits until its stdout has a line matching `ready`. */
export async function startDst(
  args: string[],
  ready: RegExp,
  env: Record<string, string> = {},
): Promise<RunningDst> {
  await freshBundle();
  const process = new Deno.Command(Deno.execPath(), {
    args: [...DENO_RUN_ARGS, BUNDLE, ...args],
    env: { XDG_STATE_HOME: TEST_STATE_HOME, ...env },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  return await serving(process, `dst ${args[0]}`, ready);
}

/** Follows a spawned dst process until its stdout matches `ready`; its log is kept. */
export async function serving(
  process: Deno.ChildProcess,
  what: string,
  ready: RegExp,
): Promise<RunningDst> {
  let stderr = "";
  void (async () => {
    for await (const chunk of process.stderr.pipeThrough(new TextDecoderStream())) stderr += chunk;
  })().catch(() => {});
  const reader = process.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let stdout = "";
  let match: RegExpMatchArray | null = null;
  while (match === null) {
    const { value, done } = await reader.read();
    if (done) {
      const status = await process.status;
      throw new Error(
        `${what} exited (${status.code}) before serving:\n${stdout}\n${stderr}`,
      );
    }
    stdout += value;
    match = stdout.match(ready);
  }
  void (async () => {
    while (!(await reader.read()).done) { /* drain */ }
  })().catch(() => {});
  let stopped: Promise<Deno.CommandStatus> | null = null;
  return {
    process,
    ready: match,
    log: () => stderr,
    stop(signal: Deno.Signal = "SIGTERM") {
      if (stopped === null) {
        try {
          process.kill(signal);
        } catch {
          // already exited
        }
        stopped = process.status;
      }
      return stopped;
    },
  };
}

/**
 * Runs `body` against `dst export ARGS...` started in a fresh temp dir (`args` gets the
 * dir and may first put files there), then kills the export and removes the dir.
 */
export async function withExport(
  prefix: string,
  args: (dir: string) => string[] | Promise<string[]>,
  body: (server: RunningExport, dir: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix });
  try {
    const server = await startExport(await args(dir));
    try {
      await body(server, dir);
    } finally {
      await server.stop("SIGKILL");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** `withExport` args for a new SIZE image, DIR/disk.img, served on a free local port. */
export function newDisk(size: string): (dir: string) => string[] {
  return (dir) => [`${dir}/disk.img`, "--create", size, "--listen", "127.0.0.1:0"];
}

const RUN_TIMEOUT_MS = 60_000;

/**
 * Runs `dst ARGS...` to completion (killed after a minute) and returns its exit code and
 * output. `env` adds to (or overrides) the environment, XDG_STATE_HOME included.
 */
export async function runDst(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  await freshBundle();
  const output = await new Deno.Command(Deno.execPath(), {
    args: [...DENO_RUN_ARGS, BUNDLE, ...args],
    env: { XDG_STATE_HOME: TEST_STATE_HOME, ...env },
    stdout: "piped",
    stderr: "piped",
    // A command that should end but serves instead fails its test rather than hanging the suite.
    signal: AbortSignal.timeout(RUN_TIMEOUT_MS),
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

/**
 * Runs `body` in a fresh temp dir; every process it starts through `track` is killed
 * (SIGKILL, which also ends a stopped one; a no-op for one already gone) and the dir
 * removed afterwards.
 */
export async function scenario(
  prefix: string,
  body: (dir: string, track: <T extends RunningDst>(running: T) => T) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix });
  const running: RunningDst[] = [];
  const track = <T extends RunningDst>(process: T): T => {
    running.push(process);
    return process;
  };
  try {
    await body(dir, track);
  } finally {
    await Promise.all(running.map((process) => process.stop("SIGKILL")));
    await Deno.remove(dir, { recursive: true });
  }
}

/** `dst export DIR/NAME --create SIZE` on a free loopback port (EXTRA: more options). */
export function exportImage(
  dir: string,
  name: string,
  size: string,
  ...extra: string[]
): Promise<RunningExport> {
  return startExport([`${dir}/${name}`, "--create", size, "--listen", "127.0.0.1:0", ...extra]);
}
