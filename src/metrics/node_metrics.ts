/**
 * One `/metrics` for a node that `dst up` runs: the process's own metrics, and each
 * item's in a registry of its own, every series labelled with the item
 * (`item="exports[0]"`). Two exports register the same names (dst_export_reads_total),
 * which one prom-client Registry refuses, so each item keeps its own and the scrape
 * joins their texts: each family's HELP and TYPE once, then its series from every item.
 */

import { Registry } from "prom-client";
import { processRegistry } from "./registry.ts";

/** What MetricsServer serves: a prom-client Registry, or a node of them. */
export interface MetricsSource {
  metrics(): Promise<string>;
  readonly contentType: string;
}

export class NodeMetrics implements MetricsSource {
  readonly #process = processRegistry();
  readonly #items: Registry[] = [];

  get contentType(): string {
    return this.#process.contentType;
  }

  /** A registry for one item: what it registers is shown with the label item=`label`. */
  registryFor(label: string): Registry {
    const registry = new Registry();
    registry.setDefaultLabels({ item: label });
    this.#items.push(registry);
    return registry;
  }

  /** Every registry's metrics; one whose collection fails is left out, not the whole scrape. */
  async metrics(): Promise<string> {
    const texts = await Promise.allSettled(
      [this.#process, ...this.#items].map((registry) => registry.metrics()),
    );
    return joinFamilies(texts.flatMap((text) => text.status === "fulfilled" ? [text.value] : []));
  }
}

/**
 * Joins Prometheus text-format expositions whose families may repeat: each family's
 * `# HELP` and `# TYPE` lines once (the first seen), then the series of every text in
 * order. A family's series follow its HELP line in each text (histogram _bucket, _sum
 * and _count lines included), as prom-client writes them.
 */
export function joinFamilies(texts: string[]): string {
  const families = new Map<string, { head: string[]; series: string[] }>();
  for (const text of texts) {
    let current: { head: string[]; series: string[] } | undefined;
    for (const line of text.split("\n")) {
      if (line === "") continue;
      const comment = line.match(/^# (HELP|TYPE) (\S+)/);
      if (comment !== null) {
        const name = comment[2]!;
        let family = families.get(name);
        if (family === undefined) {
          family = { head: [], series: [] };
          families.set(name, family);
        }
        const seen = family.head.some((head) => head.startsWith(`# ${comment[1]} `));
        if (!seen) family.head.push(line);
        current = family;
        continue;
      }
      if (line.startsWith("#")) continue; // another comment: none that a scraper needs
      if (current === undefined) {
        // A series before any HELP line: its own family, by its name.
        const name = line.match(/^[^\s{]+/)?.[0] ?? line;
        current = families.get(name) ?? { head: [], series: [] };
        families.set(name, current);
      }
      current.series.push(line);
    }
  }
  const out: string[] = [];
  for (const family of families.values()) out.push(...family.head, ...family.series, "");
  return out.join("\n");
}
