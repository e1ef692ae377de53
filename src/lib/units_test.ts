import assert from "node:assert/strict";
import { UsageError } from "./errors.ts";
import {
  formatBytes,
  formatDuration,
  formatSizeOption,
  parseCount,
  parseSize,
  SIZE_SUFFIXES,
} from "./units.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

Deno.test("parseSize() reads plain bytes and binary K/M/G/T/P suffixes", () => {
  assert.equal(parseSize("4096"), 4096);
  assert.equal(parseSize("0"), 0);
  assert.equal(parseSize("64K"), 64 * KiB);
  assert.equal(parseSize("64k"), 64 * KiB);
  assert.equal(parseSize("16M"), 16 * MiB);
  assert.equal(parseSize("1G"), GiB);
  assert.equal(parseSize("2T"), 2 * TiB);
  assert.equal(parseSize("1P"), 1024 * TiB);
});

Deno.test("the suffixes a bad size's message lists are the ones parseSize() takes, P included", () => {
  assert.equal(SIZE_SUFFIXES, "K, M, G, T, P");
  for (const suffix of SIZE_SUFFIXES.split(", ")) parseSize(`1${suffix}`);
  assert.throws(() => parseSize("1E"), UsageError, "E is not one of them");
  assert.throws(
    () => parseSize("lots", "--size"),
    (error: Error) =>
      error.message ===
        'Cannot read --size "lots": use a number of bytes, or one with K, M, G, T, P (binary ' +
          "multiples), e.g. 1G",
  );
});

Deno.test("formatSizeOption() gives a size parseSize() reads back: the largest exact suffix, else bytes", () => {
  assert.equal(formatSizeOption(64 * MiB), "64M");
  assert.equal(formatSizeOption(1536 * KiB), "1536K");
  assert.equal(formatSizeOption(1024 * TiB), "1P");
  assert.equal(formatSizeOption(4097), "4097");
  assert.equal(formatSizeOption(0), "0");
  for (const bytes of [0, 1, 4096, 64 * MiB, 3 * GiB + 4 * KiB, 5 * TiB, 2 ** 53 - 1]) {
    assert.equal(parseSize(formatSizeOption(bytes)), bytes, String(bytes));
  }
});

Deno.test("parseSize() reads B, iB and fractional sizes", () => {
  assert.equal(parseSize("1.5GiB"), 1.5 * GiB);
  assert.equal(parseSize("2TB"), 2 * TiB);
  assert.equal(parseSize("512b"), 512);
  assert.equal(parseSize("64KiB"), 64 * KiB);
  assert.equal(parseSize("0.5M"), 512 * KiB);
  assert.equal(parseSize(" 1 G "), GiB, "spaces around are allowed");
});

Deno.test("parseSize() rejects text that is not a size", () => {
  for (const text of ["", " ", "abc", "-1", "1X", "G", "1.G", "1GG", "0x10", "1,5G", "1e3"]) {
    assert.throws(() => parseSize(text), UsageError, JSON.stringify(text));
  }
});

Deno.test("parseSize() names what it was reading in its error", () => {
  assert.throws(() => parseSize("lots", "--create"), (error: unknown) => {
    assert.ok(error instanceof UsageError);
    assert.match(error.message, /--create/);
    assert.match(error.message, /"lots"/);
    return true;
  });
});

Deno.test("parseSize() rejects sizes beyond a safe integer", () => {
  assert.throws(() => parseSize("8P"), UsageError); // 2^53
  assert.throws(() => parseSize("99999999999999999999"), UsageError);
  assert.equal(parseSize("7P"), 7 * 1024 * TiB);
});

Deno.test("formatBytes() prints bytes below 1 KiB as whole bytes", () => {
  assert.equal(formatBytes(0), "0 B");
  assert.equal(formatBytes(512), "512 B");
  assert.equal(formatBytes(1023), "1023 B");
});

Deno.test("formatBytes() prints larger sizes with one decimal and a binary unit", () => {
  assert.equal(formatBytes(KiB), "1.0 KiB");
  assert.equal(formatBytes(4 * KiB), "4.0 KiB");
  assert.equal(formatBytes(1536), "1.5 KiB");
  assert.equal(formatBytes(64 * MiB), "64.0 MiB");
  assert.equal(formatBytes(1.5 * GiB), "1.5 GiB");
  assert.equal(formatBytes(2 * TiB), "2.0 TiB");
  assert.equal(formatBytes(1024 * TiB), "1.0 PiB");
  assert.equal(formatBytes(2048 * 1024 * TiB), "2048.0 PiB", "PiB is the largest unit");
});

Deno.test("formatDuration() prints under a minute as seconds with one decimal", () => {
  assert.equal(formatDuration(0), "0.0s");
  assert.equal(formatDuration(7800), "7.8s");
  assert.equal(formatDuration(59_000), "59.0s");
});

Deno.test("formatDuration() prints minutes, hours and days as two units", () => {
  assert.equal(formatDuration(60_000), "1m 0s");
  assert.equal(formatDuration((5 * 60 + 6) * 1000), "5m 6s");
  assert.equal(formatDuration(3_600_000), "1h 0m");
  assert.equal(formatDuration((4 * 60 + 59) * 60_000), "4h 59m");
  assert.equal(formatDuration(24 * 3_600_000), "1d 0h");
  assert.equal(formatDuration((3 * 24 + 4) * 3_600_000), "3d 4h");
});

Deno.test("parseCount() accepts whole numbers within its bounds, inclusive", () => {
  assert.equal(parseCount("1", "--retries", 1, 10), 1);
  assert.equal(parseCount("7", "--retries", 1, 10), 7);
  assert.equal(parseCount("10", "--retries", 1, 10), 10);
  assert.equal(parseCount("0", "--retries", 0, 0), 0);
});

Deno.test("parseCount() rejects numbers outside its bounds and non-integers", () => {
  for (const text of ["0", "11", "-1", "1.5", "", "abc", "1e1", "0x5", "5s"]) {
    assert.throws(() => parseCount(text, "--retries", 1, 10), UsageError, JSON.stringify(text));
  }
  assert.throws(() => parseCount("9007199254740993", "--n", 0, Number.MAX_VALUE), UsageError);
});

Deno.test("parseCount() says what it wanted in its error", () => {
  assert.throws(() => parseCount("99", "--window", 1, 64), (error: unknown) => {
    assert.ok(error instanceof UsageError);
    assert.match(error.message, /--window must be a whole number from 1 to 64, not "99"/);
    return true;
  });
});
