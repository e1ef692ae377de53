import assert from "node:assert/strict";
import { plural } from "./plural.ts";

Deno.test("plural() takes the singular for exactly one, the plural for any other count", () => {
  assert.equal(plural(1, "item"), "1 item");
  assert.equal(plural(0, "item"), "0 items");
  assert.equal(plural(2, "region"), "2 regions");
  assert.equal(plural(1, "entry", "entries"), "1 entry");
  assert.equal(plural(5, "entry", "entries"), "5 entries");
});
