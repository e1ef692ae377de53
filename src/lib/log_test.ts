import assert from "node:assert/strict";
import { colourWanted, formatJson, formatText, type LogLine } from "./log.ts";

const line: LogLine = {
  timeMs: Date.UTC(2026, 0, 2, 3, 4, 5, 678),
  level: "warn",
  component: "export",
  message: "127.0.0.1:4000: refused",
  fields: { peer: "127.0.0.1:4000", count: 3 },
};

Deno.test("formatJson() writes one object a line: time, level, component, message, fields", () => {
  const text = formatJson(line);
  assert.ok(text.endsWith("\n"));
  assert.equal(text.indexOf("\n"), text.length - 1, "one line");
  assert.deepEqual(JSON.parse(text), {
    time: "2026-01-02T03:04:05.678Z",
    level: "warn",
    component: "export",
    message: "127.0.0.1:4000: refused",
    fields: { peer: "127.0.0.1:4000", count: 3 },
  });
  assert.deepEqual(JSON.parse(formatJson({ ...line, fields: {} })).fields, {});
});

Deno.test("formatJson() keeps network text exact, yet one line with no raw control or bidi character", () => {
  const message = "name\nFORGED INFO line\x1b[31m\u202eevil\u2028";
  const text = formatJson({ ...line, message, fields: { name: "a\rb", big: 2n ** 64n } });
  assert.equal(text.indexOf("\n"), text.length - 1);
  // deno-lint-ignore no-control-regex
  assert.doesNotMatch(text.slice(0, -1), /[\x00-\x1f\x7f-\x9f\u202e\u2028]/);
  const parsed = JSON.parse(text);
  assert.equal(parsed.message, message);
  assert.deepEqual(parsed.fields, { name: "a\rb", big: "18446744073709551616" });
});

Deno.test("formatText() writes TIME LEVEL component: message key=value", () => {
  assert.equal(
    formatText(line, false),
    "2026-01-02T03:04:05.678Z WARN  export: 127.0.0.1:4000: refused peer=127.0.0.1:4000 count=3\n",
  );
  assert.equal(
    formatText({ ...line, level: "info", fields: {} }, false),
    "2026-01-02T03:04:05.678Z INFO  export: 127.0.0.1:4000: refused\n",
  );
});

Deno.test("formatText() escapes control characters in the message and fields", () => {
  const text = formatText(
    { ...line, message: "a\nb\x1b[2J", fields: { name: "x\ny" } },
    false,
  );
  assert.equal(text, "2026-01-02T03:04:05.678Z WARN  export: a\\x0ab\\x1b[2J name=x\\x0ay\n");
});

const ESC = "\x1b";

Deno.test("formatText() colours only the level, and only when asked", () => {
  assert.ok(!formatText(line, false).includes(ESC));
  const coloured = formatText(line, true);
  assert.ok(coloured.includes(` ${ESC}[33mWARN ${ESC}[0m export: `), coloured);
  assert.equal(
    coloured.replaceAll(`${ESC}[33m`, "").replaceAll(`${ESC}[0m`, ""),
    formatText(line, false),
  );
});

Deno.test("colourWanted() is false with NO_COLOR set, and off a terminal", () => {
  const before = Deno.env.get("NO_COLOR");
  try {
    Deno.env.set("NO_COLOR", "1");
    assert.equal(colourWanted(), false);
    Deno.env.delete("NO_COLOR");
    assert.equal(colourWanted(), Deno.stderr.isTerminal());
  } finally {
    if (before === undefined) Deno.env.delete("NO_COLOR");
    else Deno.env.set("NO_COLOR", before);
  }
});
