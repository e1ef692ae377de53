import assert from "node:assert/strict";
import { UsageError } from "../lib/errors.ts";
import { logSettingsOf } from "./args.ts";

Deno.test("logSettingsOf() takes levels and formats in any case, from the options and DST_LOG", () => {
  const options = logSettingsOf(
    { values: { "log-level": "WARN", "log-format": "Json" }, positionals: [] },
    "export",
    undefined,
  );
  assert.equal(options.level, "warn");
  assert.equal(options.format, "json");
  const env = logSettingsOf({ values: {}, positionals: [] }, "export", "Debug");
  assert.equal(env.level, "debug");
  assert.equal(env.format, "text");
});

Deno.test("logSettingsOf() refuses an unknown level, naming the known ones", () => {
  assert.throws(
    () => logSettingsOf({ values: {}, positionals: [] }, "export", "LOUD"),
    (error: Error) =>
      error instanceof UsageError &&
      error.message === 'DST_LOG is "LOUD"; it must be debug, info, warn or error',
  );
});
