/**
 * How the CLI reports bad usage: one "dst COMMAND:" prefix, a mistyped long option
 * gets the command's own option it most likely meant, and a mistyped command the
 * command.
 */

import assert from "node:assert/strict";
import { runDst } from "../helpers/spawn.ts";

Deno.test("a usage error has one prefix, naming the command", async () => {
  const result = await runDst(["export", "/nonexistent/x.img", "--create", "1M", "--read-only"]);
  assert.equal(result.code, 2, result.stderr);
  assert.match(result.stderr, /^dst export: --create writes the image/);
  assert.doesNotMatch(result.stderr, /dst: dst/);

  const unknown = await runDst(["status", "--frobnicate"]);
  assert.equal(unknown.code, 2, unknown.stderr);
  assert.match(unknown.stderr, /^dst status: /);
  assert.doesNotMatch(unknown.stderr, /dst: dst/);

  const badSize = await runDst(["export", "/nonexistent/x.img", "--create", "lots"]);
  assert.equal(badSize.code, 2, badSize.stderr);
  assert.match(badSize.stderr, /^dst export: Cannot read --create "lots"/);
});

Deno.test("a mistyped long option gets 'did you mean' with the command's own option", async () => {
  const listen = await runDst(["export", "/nonexistent/x.img", "--lisen", ":1025"]);
  assert.equal(listen.code, 2, listen.stderr);
  assert.match(listen.stderr, /^dst export: unknown option --lisen; did you mean --listen\?/);

  const readOnly = await runDst(["attach", "127.0.0.1:1", "--readonly"]);
  assert.equal(readOnly.code, 2, readOnly.stderr);
  assert.match(readOnly.stderr, /unknown option --readonly; did you mean --read-only\?/);

  const far = await runDst(["export", "/nonexistent/x.img", "--frobnicate"]);
  assert.equal(far.code, 2, far.stderr);
  assert.match(far.stderr, /unknown option --frobnicate/);
  assert.doesNotMatch(far.stderr, /did you mean/);
  assert.match(far.stderr, /see `dst export --help`/);
});

Deno.test("a mistyped command gets 'did you mean' with the command", async () => {
  const exprot = await runDst(["exprot", "/nonexistent/x.img"]);
  assert.equal(exprot.code, 2, exprot.stderr);
  assert.match(exprot.stderr, /^dst: unknown command "exprot"; did you mean export\?\n/);

  const far = await runDst(["frobnicate"]);
  assert.equal(far.code, 2, far.stderr);
  assert.match(far.stderr, /^dst: unknown command "frobnicate"\n/);
});
