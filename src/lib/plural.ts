/** Counts in messages: "1 item", "2 items", never "1 items". */

/**
 * `count` and the noun that goes with it: `singular` for exactly 1, else `pluralForm`
 * (the singular with an "s" unless given: plural(n, "entry", "entries")).
 *
 * @example
 * ```ts
 * import { plural } from "./plural.ts";
 * if (plural(1, "item") !== "1 item") throw new Error("one item");
 * if (plural(3, "key") !== "3 keys") throw new Error("three keys");
 * ```
 */
export function plural(count: number, singular: string, pluralForm = `${singular}s`): string {
  return `${count} ${count === 1 ? singular : pluralForm}`;
}
