import assert from "node:assert/strict";
import { printable } from "./printable.ts";

Deno.test("printable() leaves plain text, accents and emoji as they are", () => {
  assert.equal(
    printable("disk0.img on 10.0.0.5:1025, été ✓ 💾"),
    "disk0.img on 10.0.0.5:1025, été ✓ 💾",
  );
});

Deno.test("printable() escapes a newline, a carriage return and a terminal escape sequence", () => {
  assert.equal(printable("a\nINFO forged\r\x1b[31mred"), "a\\x0aINFO forged\\x0d\\x1b[31mred");
});

Deno.test("printable() escapes NUL, DEL, C1 controls and bidi overrides", () => {
  assert.equal(printable("\x00\x7f\x9b\u202eabc\u2066"), "\\x00\\x7f\\x9b\\u{202e}abc\\u{2066}");
});
