/**
 * Waiting for what gives no event to wait on (a log file growing, a socket file
 * appearing, a proxy noticing a FIN, a client's connected flag): `condition` is
 * asked every `everyMs` until it holds, and the wait fails, naming `what`, after
 * `timeoutMs`.
 */
export async function waitUntil(
  condition: () => boolean | Promise<boolean>,
  what: string,
  { timeoutMs, everyMs = 20 }: { timeoutMs: number; everyMs?: number },
): Promise<void> {
  const untilMs = performance.now() + timeoutMs;
  while (!(await condition())) {
    if (performance.now() > untilMs) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
}

/** Whether a file exists at `path` now. */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}
