/** onUncaught(): an error nothing caught reaches the handler, and the process goes on. */

import assert from "node:assert/strict";
import { onUncaught } from "./signals.ts";

Deno.test("onUncaught() hands over a rejection nobody awaited and a throw in a timer, and stops when told", async () => {
  const seen: unknown[] = [];
  const stop = onUncaught((error) => seen.push(error));
  try {
    const rejection = new Error("a rejection nobody awaited");
    void Promise.reject(rejection);
    const thrown = new Error("a throw in a timer");
    setTimeout(() => {
      throw thrown;
    }, 0);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual(seen, [rejection, thrown]);
  } finally {
    stop();
  }
});
