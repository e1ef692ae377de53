/** How far apart two short words are, for "did you mean" hints. */

/**
 * The Levenshtein distance: the fewest single-character insertions, deletions and
 * substitutions that turn `a` into `b`. Quadratic: meant for option names, not text.
 *
 * @example
 * ```ts
 * import { editDistance, nearest } from "./edit_distance.ts";
 * if (editDistance("lisen", "listen") !== 1) throw new Error("one letter is missing");
 * if (nearest("lisen", ["listen", "nbd"]) !== "listen") throw new Error("--lisen is --listen");
 * ```
 */
export function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const substitution = previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1);
      current.push(Math.min(previous[j]! + 1, current[j - 1]! + 1, substitution));
    }
    previous = current;
  }
  return previous[b.length]!;
}

/**
 * The candidate nearest `word`, when it is near enough to be what was meant (at most
 * one edit for words up to 5 letters, two beyond); else undefined.
 */
export function nearest(word: string, candidates: Iterable<string>): string | undefined {
  const editsMax = word.length <= 5 ? 1 : 2;
  let best: string | undefined;
  let bestDistance = editsMax + 1;
  for (const candidate of candidates) {
    const distance = editDistance(word, candidate);
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best;
}
