/**
 * Text that came from the network, made safe to print: control characters (a newline
 * that would forge a second log line, an escape sequence that would drive the
 * terminal) and the bidirectional overrides that reorder what a reader sees are shown
 * as escapes instead. Log lines, tables and error messages pass such text through
 * here; JSON output escapes by itself.
 */

// Control characters are exactly what this matches, on purpose.
// deno-lint-ignore no-control-regex
const UNPRINTABLE = /[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

/** `text` with every control or bidi-override character escaped (`\x1b`, `\u{202e}`). */
export function printable(text: string): string {
  return text.replace(UNPRINTABLE, (c) => {
    const code = c.codePointAt(0)!;
    return code <= 0xff ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u{${code.toString(16)}}`;
  });
}
