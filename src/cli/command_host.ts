/**
 * What a serving command (`dst export`, `dst array`, `dst attach`) asks of whoever runs
 * it: when to stop, where its output goes, whom to tell it is serving, and where its
 * metrics go. Run from the command line (main.ts) that is this process's signals and
 * stdout; run as an item of `dst up` it is that node's (src/cli/up.ts), so one process
 * serves every item of a node file with the same code as the commands typed by hand.
 */

import type { Registry } from "prom-client";
import { untilSignal } from "./signals.ts";

export interface CommandHost {
  /**
   * Resolves when the command is to stop: the name of the signal, or of what else said
   * so. Called once the command is serving, right before its ready lines: until then a
   * signal has the default effect, so a start that hangs (a leg that does not answer)
   * can still be interrupted.
   */
  untilStop(): Promise<string>;
  /** Prints a line of the command's output (its ready lines, which scripts read). */
  print(line: string): void;
  /** Called once, after the last ready line: the command is serving. */
  ready(): void;
  /**
   * Where the command registers its metrics when the host serves them (one `/metrics`
   * for a whole node); undefined, the command serves its own `--metrics`, if given.
   */
  readonly metrics?: Registry;
  /**
   * The host set up the log for every command it runs (dst up's node file): the
   * command does not apply log options of its own.
   */
  readonly logConfigured: boolean;
  /**
   * Only check the command line: the command reads and checks everything it is given
   * (options, key files, paths), then returns 0 before it listens, opens, creates or
   * connects anything. How `dst up` checks every item before it starts one.
   */
  readonly onlyCheck: boolean;
}

/** The host of a command run from the command line: SIGINT or SIGTERM stops it. */
export const COMMAND_LINE: CommandHost = {
  untilStop: () => untilSignal(),
  print: (line) => console.log(line),
  ready: () => {},
  logConfigured: false,
  onlyCheck: false,
};
