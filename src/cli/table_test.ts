import assert from "node:assert/strict";
import { formatTable } from "./table.ts";

Deno.test("formatTable() pads columns to their widest cell", () => {
  assert.equal(formatTable(["A", "BB"], [["xyz", "1"], ["", "22"]]), "A    BB\nxyz  1\n     22");
});

Deno.test("formatTable() escapes control characters in cells (STATUS fields come from the network)", () => {
  const table = formatTable(["PATH"], [["/srv/a\n/srv/forged\x1b[2J"]]);
  assert.equal(table, "PATH\n/srv/a\\x0a/srv/forged\\x1b[2J");
});
