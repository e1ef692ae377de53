/**
 * Log lines to stderr: one line per event, with a time, a level and a component.
 * stdout stays free for what a command prints on purpose (addresses, tables, JSON).
 * The level comes from DST_LOG (debug, info, warn, error; default info).
 */

import { printable } from "./printable.ts";

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;
type Level = keyof typeof LEVELS;

function levelFromEnv(): number {
  let name: string | undefined;
  try {
    name = Deno.env.get("DST_LOG");
  } catch {
    // Without env permission, fall back to the default level.
  }
  if (name !== undefined && name in LEVELS) return LEVELS[name as Level];
  return LEVELS.info;
}

const threshold = levelFromEnv();
const encoder = new TextEncoder();

function emit(level: Level, component: string, message: string): void {
  if (LEVELS[level] < threshold) return;
  const line = `${new Date().toISOString()} ${level.toUpperCase().padEnd(5)} ${component}: ${
    printable(message)
  }\n`;
  Deno.stderr.writeSync(encoder.encode(line));
}

export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export function logger(component: string): Logger {
  return {
    debug: (message) => emit("debug", component, message),
    info: (message) => emit("info", component, message),
    warn: (message) => emit("warn", component, message),
    error: (message) => emit("error", component, message),
  };
}

/** A logger that drops every line: for tests, and for code made in code that should say nothing. */
export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
