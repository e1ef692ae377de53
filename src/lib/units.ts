/** Sizes and durations as people write and read them. */

import { UsageError } from "./errors.ts";

const SUFFIX_SHIFT: Record<string, number> = { "": 0, k: 10, m: 20, g: 30, t: 40, p: 50 };

/**
 * The suffixes parseSize takes, for messages that list them: "K, M, G, T, P" (as in
 * "K, M, G, T, P are binary multiples"). Made from the table, so they never disagree.
 */
export const SIZE_SUFFIXES = Object.keys(SUFFIX_SHIFT).filter((suffix) => suffix !== "")
  .map((suffix) => suffix.toUpperCase()).join(", ");

/**
 * Parses "4096", "64K", "1G", "1.5GiB", "2TB" into bytes (binary multiples).
 *
 * @example
 * ```ts
 * import { parseSize } from "./units.ts";
 * if (parseSize("1G") !== 1073741824) throw new Error("1G is 2^30 bytes");
 * ```
 */
export function parseSize(text: string, what = "size"): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$/i.exec(text);
  if (match === null) {
    throw new UsageError(
      `Cannot read ${what} "${text}": use a number of bytes, or one with ${SIZE_SUFFIXES} ` +
        `(binary multiples), e.g. 1G`,
    );
  }
  const shift = SUFFIX_SHIFT[match[2]!.toLowerCase()]!;
  const bytes = Number(match[1]) * 2 ** shift;
  if (!Number.isInteger(bytes)) {
    throw new UsageError(`${what} "${text}" is not a whole number of bytes`);
  }
  if (!Number.isSafeInteger(bytes)) {
    throw new UsageError(`${what} "${text}" is too large`);
  }
  return bytes;
}

/**
 * Bytes as a size the command line takes back (parseSize): the largest suffix that
 * divides them exactly, 64M, 1536K, 1P; a number of bytes when none does.
 */
export function formatSizeOption(bytes: number): string {
  let best = String(bytes);
  for (const [suffix, shift] of Object.entries(SUFFIX_SHIFT)) {
    const unit = 2 ** shift;
    if (suffix !== "" && bytes > 0 && bytes % unit === 0) {
      best = `${bytes / unit}${suffix.toUpperCase()}`;
    }
  }
  return best;
}

/** Formats bytes with a binary unit: 1.5 GiB, 4.0 KiB, 512 B. */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1023.95 && unit < units.length - 1) { // 1023.96 KiB prints as 1.0 MiB
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** Formats a duration in milliseconds as 3d 4h, 5m 6s, 7.8s. */
export function formatDuration(ms: number): string {
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${Math.floor(s % 60)}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

/** Parses a whole number of milliseconds or a count from the command line. */
export function parseCount(text: string, what: string, min: number, max: number): number {
  const value = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new UsageError(`${what} must be a whole number from ${min} to ${max}, not "${text}"`);
  }
  return value;
}
