/** Waiting for SIGINT or SIGTERM, so a server can stop cleanly; a second signal exits at once. */

export function untilSignal(): Promise<Deno.Signal> {
  return new Promise((resolve) => {
    let received = false;
    const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
    for (const signal of signals) {
      Deno.addSignalListener(signal, () => {
        if (received) Deno.exit(130); // the user insists: stop without finishing
        received = true;
        resolve(signal);
      });
    }
  });
}
