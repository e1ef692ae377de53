/**
 * `deno task sim [--seeds N] [--first SEED] [--seed SEED]`: runs the mirror
 * simulation (mirror_sim.ts) for N seeds (default 1000) from a random first seed, or
 * replays one seed with its schedule and log. A failing seed prints how to replay it.
 */

import { simulate } from "./mirror_sim.ts";

function option(name: string): number | null {
  const i = Deno.args.indexOf(`--${name}`);
  if (i < 0) return null;
  const value = Number(Deno.args[i + 1]);
  if (!Number.isSafeInteger(value) || value < 0) {
    console.error(`dst sim: --${name} takes a whole number, not ${Deno.args[i + 1]}`);
    Deno.exit(2);
  }
  return value;
}

const unknown = Deno.args.filter((a, i) =>
  a.startsWith("--")
    ? !["--seeds", "--first", "--seed"].includes(a)
    : !Deno.args[i - 1]?.startsWith("--")
);
if (unknown.length > 0) {
  console.error(
    `dst sim: unknown arguments ${unknown.join(" ")}; use --seeds N, --first SEED or --seed SEED`,
  );
  Deno.exit(2);
}

const one = option("seed");
if (one !== null) {
  const outcome = await simulate(one, { trace: true });
  console.log(outcome.schedule.concat(outcome.log).sort(byTime).join("\n"));
  console.log(
    outcome.failure === null
      ? `seed ${one}: ok (${outcome.ops} operations, ${outcome.simulatedMs} ms simulated)`
      : `seed ${one} FAILED: ${outcome.failure}`,
  );
  Deno.exit(outcome.failure === null ? 0 : 1);
}

const seeds = option("seeds") ?? 1000;
const first = option("first") ?? Math.floor(Math.random() * 2 ** 31);
const started = performance.now();
let failed = 0;
for (let seed = first; seed < first + seeds; seed++) {
  const outcome = await simulate(seed);
  if (outcome.failure !== null) {
    failed += 1;
    // The first few in full; the rest are counted (one bug tends to fail many seeds).
    if (failed <= 5) {
      console.log(
        `seed ${seed} FAILED: ${outcome.failure}\n  replay: deno task sim --seed ${seed}`,
      );
    }
  }
}
const seconds = (performance.now() - started) / 1000;
console.log(
  `${seeds} seeds from ${first}: ${seeds - failed} passed, ${failed} failed in ` +
    `${seconds.toFixed(1)} s (${(seeds / seconds).toFixed(1)} seeds/s)`,
);
Deno.exit(failed === 0 ? 0 : 1);

/** Orders schedule and log lines by their leading simulated time (stable). */
function byTime(a: string, b: string): number {
  return Number(a.split(" ", 1)[0]) - Number(b.split(" ", 1)[0]);
}
