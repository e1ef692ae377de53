/**
 * The program the integration tests run, never older than its sources. They spawn
 * the single-file bundle dist/dst.js as a user runs it; `deno task test` builds it
 * first, but `deno test FILE` alone would run whatever bundle an earlier build left,
 * and pass or fail on old code. So before the first spawn, freshBundle() compares the
 * bundle with every source it is made of (main.ts, src/, deno.json, deno.lock) and
 * runs `deno task bundle` when any is newer, or the bundle is missing. A lock file
 * keeps two test processes from building it at once.
 */

const ROOT = new URL("../../", import.meta.url).pathname;

/** The bundled CLI; call freshBundle() before spawning it. */
export const BUNDLE = `${ROOT}dist/dst.js`;

let checked: Promise<string> | null = null;

/** BUNDLE, built first if it is missing or older than a source; checked once per process. */
export function freshBundle(): Promise<string> {
  checked ??= buildIfStale();
  return checked;
}

async function buildIfStale(): Promise<string> {
  await Deno.mkdir(`${ROOT}dist`, { recursive: true });
  const lock = await Deno.open(`${ROOT}dist/.bundle.lock`, { write: true, create: true });
  try {
    await lock.lock(true);
    const why = staleBecause(ROOT);
    if (why !== null) {
      const output = await new Deno.Command(Deno.execPath(), {
        args: ["task", "--quiet", "bundle"],
        cwd: ROOT,
        stdout: "piped",
        stderr: "piped",
      }).output();
      if (!output.success) {
        throw new Error(
          `deno task bundle failed (the bundle was stale: ${why}):\n` +
            new TextDecoder().decode(output.stderr),
        );
      }
    }
    return BUNDLE;
  } finally {
    lock.close(); // closing lets the lock go
  }
}

/**
 * Why the bundle under `root` must be built again (it is missing, or a source is
 * newer: which), or null when it is up to date.
 */
export function staleBecause(root: string): string | null {
  const built = modified(`${root}dist/dst.js`);
  if (built === null) return "dist/dst.js is missing";
  const newest = newestSource(root);
  return newest.ms > built ? `${newest.path.slice(root.length)} is newer than dist/dst.js` : null;
}

/** The newest file the bundle is made of. */
function newestSource(root: string): { path: string; ms: number } {
  let newest = { path: "", ms: 0 };
  const consider = (path: string) => {
    const ms = modified(path);
    if (ms !== null && ms > newest.ms) newest = { path, ms };
  };
  for (const file of ["main.ts", "deno.json", "deno.lock"]) consider(`${root}${file}`);
  const walk = (dir: string) => {
    for (const entry of Deno.readDirSync(dir)) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory) walk(path);
      else if (entry.name.endsWith(".ts")) consider(path);
    }
  };
  walk(`${root}src`);
  return newest;
}

/** A file's modification time in ms, or null when it does not exist. */
function modified(path: string): number | null {
  try {
    return Deno.statSync(path).mtime?.getTime() ?? null;
  } catch {
    return null;
  }
}
