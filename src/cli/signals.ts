/**
 * Waiting for a signal to stop (SIGINT or SIGTERM, or others the caller names), so a
 * server can stop cleanly; a second signal exits at once (130), after `insist` (a
 * parent passing the insistence on to its children) and a warning line saying so.
 */

import { flushLogWithin, logger } from "../lib/log.ts";

/** How long the warning may take to reach stderr before the exit goes ahead without it. */
const FLUSH_BEFORE_EXIT_MS = 1000;

export function untilSignal(
  signals: Deno.Signal[] = ["SIGINT", "SIGTERM"],
  insist: () => void = () => {},
): Promise<Deno.Signal> {
  return new Promise((resolve) => {
    let received = false;
    let exiting = false;
    for (const signal of signals) {
      Deno.addSignalListener(signal, () => {
        if (exiting) return;
        if (received) {
          exiting = true;
          insist();
          // The user insists: stop without finishing, once the line is written.
          logger("dst").warn(
            `second ${signal}: exiting at once, without finishing what is in flight`,
          );
          void flushLogWithin(FLUSH_BEFORE_EXIT_MS).then(() => Deno.exit(130));
          return;
        }
        received = true;
        resolve(signal);
      });
    }
  });
}
