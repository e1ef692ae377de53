/**
 * For tests that check something is still waiting (a flush behind a held sync, a
 * writer behind a copy): one turn of the event loop proves little, as a chain of
 * promises and zero-delay timers may need several to settle, and a check after one
 * turn passes even when the code does not wait at all. manyTurns() lets the loop run
 * far more turns than any such chain here takes, so what is still pending after it
 * waits on the thing the test holds.
 */

/** Turns a "still waiting" check lets pass. */
export const MANY_TURNS = 50;

/** Runs MANY_TURNS turns of the event loop (each one timer phase and its microtasks). */
export async function manyTurns(): Promise<void> {
  for (let i = 0; i < MANY_TURNS; i++) {
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
}
