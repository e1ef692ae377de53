/** Plain-text tables for people: columns padded to their widest cell. */

import { printable } from "../lib/printable.ts";

export function formatTable(headers: string[], rows: string[][]): string {
  const cells = rows.map((row) => row.map(printable)); // they may come from the network (STATUS)
  const widths = headers.map((header, column) =>
    Math.max(header.length, ...cells.map((row) => (row[column] ?? "").length))
  );
  const line = (cells: string[]) =>
    cells.map((cell, column) => cell.padEnd(widths[column]!)).join("  ").trimEnd();
  return [line(headers), ...cells.map(line)].join("\n");
}
