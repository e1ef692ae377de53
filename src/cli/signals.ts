/**
 * Waiting for a signal to stop (SIGINT or SIGTERM, or others the caller names), so a
 * server can stop cleanly; a second signal exits at once, after `insist` (a parent
 * passing the insistence on to its children).
 */

export function untilSignal(
  signals: Deno.Signal[] = ["SIGINT", "SIGTERM"],
  insist: () => void = () => {},
): Promise<Deno.Signal> {
  return new Promise((resolve) => {
    let received = false;
    for (const signal of signals) {
      Deno.addSignalListener(signal, () => {
        if (received) {
          insist();
          Deno.exit(130); // the user insists: stop without finishing
        }
        received = true;
        resolve(signal);
      });
    }
  });
}
