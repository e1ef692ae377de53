/**
 * How to start this same program again as a child process: `deno run
 * <permissions> --unstable-net <main module>` when running as a script or bundle, or
 * the binary alone when compiled. --unstable-net lets NBD threads share a port
 * (nbd_threads.ts).
 */

/**
 * The permissions `dst` needs, and no more than the Deno flags can say: files (images,
 * state, key files, sockets: wherever the user points), the network, environment
 * variables (DST_LOG, HOME, XDG_*, PATH), running programs (`demo` runs itself, `attach
 * --device` runs nbd-client), the host name and user id (keygen's default name, key and
 * state ownership checks), and FFI (hole punching, hole_punch.ts). Not -A: nothing is
 * imported at run time, and no other system information is read.
 */
export const DENO_PERMISSIONS = [
  "--allow-read",
  "--allow-write",
  "--allow-net",
  "--allow-env",
  "--allow-run",
  "--allow-sys=hostname,uid,gid",
  "--allow-ffi",
];

/** What `deno run` needs for this program: its permissions, and ports shared between threads. */
export const DENO_RUN_ARGS = ["run", ...DENO_PERMISSIONS, "--unstable-net"];

export function selfCommand(): { command: string; args: string[] } {
  const compiled = Deno.mainModule.includes("/deno-compile-");
  if (compiled) return { command: Deno.execPath(), args: [] };
  return { command: Deno.execPath(), args: [...DENO_RUN_ARGS, Deno.mainModule] };
}

/** Reads a child's stdout until a line matches, and returns the match (the rest is passed through). */
export async function waitForLine(
  stream: ReadableStream<Uint8Array>,
  pattern: RegExp,
  echo: (line: string) => void = () => {},
): Promise<RegExpMatchArray> {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`the child process ended before printing a line matching ${pattern}`);
    buffered += value;
    let newline: number;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      echo(line);
      const match = line.match(pattern);
      if (match !== null) {
        void (async () => {
          // Keep draining so the child never blocks on a full pipe.
          while (!(await reader.read()).done) { /* discard */ }
        })().catch(() => {});
        return match;
      }
    }
  }
}
