/**
 * The bench's simulation row: how many seeds of the mirror simulation (tests/sim/)
 * run per second, and how much simulated time a seed covers, over SEEDS seeds from a
 * fixed first one (so runs compare). A seed that fails here fails the bench.
 */

import { simulate } from "../sim/mirror_sim.ts";

const SEEDS = 300;
const FIRST_SEED = 100_000;

export interface SimBench {
  seeds: number;
  seconds: number;
  seedsPerSecond: number;
  simulatedSecondsPerSeed: number;
  operationsPerSeed: number;
}

export async function benchSim(): Promise<SimBench> {
  const started = performance.now();
  let simulatedMs = 0;
  let ops = 0;
  for (let seed = FIRST_SEED; seed < FIRST_SEED + SEEDS; seed++) {
    const outcome = await simulate(seed);
    if (outcome.failure !== null) {
      throw new Error(`simulation seed ${seed} failed: ${outcome.failure}`);
    }
    simulatedMs += outcome.simulatedMs;
    ops += outcome.ops;
  }
  const seconds = (performance.now() - started) / 1000;
  return {
    seeds: SEEDS,
    seconds,
    seedsPerSecond: SEEDS / seconds,
    simulatedSecondsPerSeed: simulatedMs / 1000 / SEEDS,
    operationsPerSeed: ops / SEEDS,
  };
}

export function printSimBench(result: SimBench): void {
  console.log(
    `\nMirror simulation: ${result.seeds} seeds in ${result.seconds.toFixed(1)} s, ` +
      `${result.seedsPerSecond.toFixed(1)} seeds/s (each ${
        result.simulatedSecondsPerSeed.toFixed(1)
      } s simulated, ${result.operationsPerSeed.toFixed(0)} operations)`,
  );
}
