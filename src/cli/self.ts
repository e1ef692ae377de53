/**
 * How to start this same program again as a child process: `deno run
 * <permissions> --unstable-net <main module>` when running as a script or bundle, or
 * the binary alone when compiled. --unstable-net lets NBD threads share a port
 * (nbd_threads.ts).
 */

/**
 * The permissions `dst` runs with: all of them (-A), because nothing narrower works.
 * What it needs is files wherever the user points (images, state, key files, sockets),
 * the network, environment variables, running programs (`demo` runs itself, `attach
 * --device` runs nbd-client), the host name and user id, and FFI (hole punching). Of
 * those flags, FFI and running programs already amount to everything; and Deno 2.9
 * refuses any path under /dev, a block device like /dev/sdc or an image in /dev/shm,
 * without --allow-all ("Requires all access"), whatever --allow-read/--allow-write say.
 * Tried, and found by the test suite's images in /dev/shm.
 */
export const DENO_PERMISSIONS = ["-A"];

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
