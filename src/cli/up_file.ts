/**
 * The node file of `dst up`: YAML whose keys are the command-line flags' own names.
 * This file owns reading and checking it (every message names FILE:LINE, the key path
 * and what is allowed) and turning each item into the command line that runs it. It
 * does not run anything: src/cli/up.ts does.
 */

import { type Document, isMap, isNode, LineCounter, parseDocument } from "yaml";
import { z } from "zod";
import { EXPORT_PORT_DEFAULT, NBD_PORT_DEFAULT } from "../constants.ts";
import { dirname, isAbsolute, resolve } from "node:path";
import { type HostPort, isAllInterfaces, parseHostPort } from "../lib/address.ts";
import { nearest } from "../lib/edit_distance.ts";
import { LOG_FORMATS, LOG_LEVELS, type LogFormat, type LogLevel } from "../lib/log.ts";
import { parseSize } from "../lib/units.ts";

/** One thing `dst up` runs: its name in the file, and the command line it stands for. */
export interface UpItem {
  /** "exports[0]", "arrays[1]", "attaches[0]": how messages name it. */
  label: string;
  /** The arguments after `dst`: ["export", "/srv/disk0.img", "--listen", ":1025", ...]. */
  args: string[];
  /** The DST port it serves (exports, arrays with `export`), for the start order. */
  servesPort: number | null;
  /** The ports of HOST:PORT members (arrays), which start after what serves them. */
  memberPorts: number[];
  /** Where the item is in the file (["arrays", 1]), its line, and each of its keys' lines. */
  at: [string, number];
  line: number;
  keyLines: Record<string, number>;
}

/** What the whole node shares: its log and its one `/metrics`. */
export interface UpNode {
  log: { level?: LogLevel; format?: LogFormat };
  /** `metrics: [HOST]:PORT`, as --metrics (default host 127.0.0.1). */
  metrics?: HostPort;
}

export type UpFileResult =
  | { ok: true; node: UpNode; items: UpItem[] }
  | { ok: false; messages: string[] };

/** A value given as text; YAML reads `timeout: 5000` as a number, which is the same flag. */
const text = z.preprocess((v) => typeof v === "number" ? String(v) : v, z.string());

/** Text that `check` accepts (it throws the flag's own message otherwise). */
function checked(check: (value: string) => unknown) {
  return text.superRefine((value, context) => {
    try {
      check(value);
    } catch (error) {
      context.addIssue({
        code: "custom",
        message: error instanceof Error ? error.message : String(error),
      });
    }
  });
}

const START_OVER = "a node file runs at every start, and --source starts the mirror over " +
  "from that member each time, discarding what it knows: make the mirror once by hand " +
  "(dst array mirror ... --source MEMBER), then let dst up reopen its state";

/** A key a node file may not hold, whatever its value, and why. */
function refused(why: string) {
  return z.unknown().superRefine((_value, context) => {
    context.addIssue({ code: "custom", message: why });
  });
}

const address = (defaultHost: string, defaultPort?: number) =>
  checked((value) => parseHostPort(value, defaultHost, defaultPort));
const size = (what: string) => checked((value) => parseSize(value, what));

/** Any case, as --log-level and DST_LOG take it. */
const lowercase = (v: unknown) => typeof v === "string" ? v.toLowerCase() : v;

const LOG = z.strictObject({
  level: z.preprocess(lowercase, z.enum(LOG_LEVELS)).optional(),
  format: z.preprocess(lowercase, z.enum(LOG_FORMATS)).optional(),
});

/**
 * What every item may set for itself (key, over the file's), and what only the node
 * has: one process serves every item, with one log and one /metrics.
 */
const COMMON = {
  key: text.optional(),
  metrics: refused(
    "metrics is the node's, at the top of the file: dst up serves one /metrics for all " +
      'its items, each series labelled item="exports[0]" and so on',
  ).optional(),
  log: refused(
    "log is the node's, at the top of the file: dst up is one process, with one log " +
      '(each line names its item: item="exports[0]" and so on)',
  ).optional(),
};

const CLIENT = {
  timeout: text.optional(),
  retries: text.optional(),
  ping: text.optional(),
  "key-name": text.optional(),
};

const SERVE = {
  protect: z.enum(["encrypt", "mac"]).optional(),
  allow: z.array(text).optional(),
  memory: size("--memory").optional(),
};

const EXPORT = z.strictObject({
  path: text,
  listen: address("0.0.0.0", EXPORT_PORT_DEFAULT).optional(),
  "read-only": z.boolean().optional(),
  create: size("--create").optional(),
  nbd: address("127.0.0.1", NBD_PORT_DEFAULT).optional(),
  "nbd-threads": text.optional(),
  state: text.optional(),
  "shared-writers": z.boolean().optional(),
  ...SERVE,
  ...COMMON,
}).superRefine((item, context) => {
  // What `dst export` refuses of these keys together, said by key and line.
  if (item["nbd-threads"] !== undefined && item.nbd === undefined) {
    problem(context, ["nbd-threads"], "goes with nbd: [HOST]:PORT (the NBD port they serve)");
  }
  if (item.create !== undefined && item["read-only"] === true) {
    problem(context, ["create"], "writes the image, so it cannot go with read-only: true");
  }
});

const ARRAY = z.strictObject({
  kind: z.enum(["linear", "mirror"]),
  members: z.array(text).min(1),
  export: address("0.0.0.0", EXPORT_PORT_DEFAULT).optional(),
  nbd: address("127.0.0.1", NBD_PORT_DEFAULT).optional(),
  state: text.optional(),
  // A node file runs at every start: a mirror made over from --source each time would
  // throw away what it knows, and with it writes acknowledged since.
  source: refused(START_OVER).optional(),
  force: refused(START_OVER).optional(),
  region: size("--region").optional(),
  ...SERVE,
  ...CLIENT,
  ...COMMON,
}).superRefine((item, context) => {
  // What `dst array` refuses of these keys together, said by key and line.
  if (item.kind === "mirror" && item.members.length < 2) {
    problem(context, ["members"], "a mirror needs at least 2 members");
  }
  if (item.export === undefined && item.nbd === undefined) {
    problem(
      context,
      ["kind"],
      "say how to serve the array: export: [HOST]:PORT and/or nbd: " +
        "[HOST]:PORT",
    );
  }
  for (const key of ["state", "region"] as const) {
    if (item.kind === "linear" && item[key] !== undefined) {
      problem(context, [key], "is for mirrors only (this array is linear)");
    }
  }
});

const ATTACH = z.strictObject({
  remote: address("127.0.0.1", EXPORT_PORT_DEFAULT),
  socket: text.optional(),
  listen: address("127.0.0.1", NBD_PORT_DEFAULT).optional(),
  device: text.optional(),
  name: text.optional(),
  "read-only": z.boolean().optional(),
  ...CLIENT,
  ...COMMON,
}).superRefine((item, context) => {
  if (item.socket !== undefined && item.listen !== undefined) {
    problem(context, ["listen"], "give socket or listen, not both");
  }
});

function problem(context: z.RefinementCtx, path: string[], message: string): void {
  context.addIssue({ code: "custom", path, message });
}

const NODE = z.strictObject({
  key: text.optional(),
  metrics: address("127.0.0.1").optional(),
  log: LOG.optional(),
  exports: z.array(EXPORT).optional(),
  arrays: z.array(ARRAY).optional(),
  attaches: z.array(ATTACH).optional(),
});

type Node = z.infer<typeof NODE>;

/** What each item must have, said when it is missing. */
const REQUIRED: Record<string, string> = {
  path: "an export needs path: the image file or block device to serve",
  kind: "an array needs kind: linear or mirror",
  members: "an array needs members: a list of HOST:PORT exports or local paths",
  remote: "an attach needs remote: the HOST:PORT of the export to attach",
};

/** Keys that are not the item's own --flags: its positional arguments, and the common ones. */
const NOT_FLAGS = new Set(["path", "kind", "members", "remote", "key"]);

/**
 * Reads the node file `text` (named `file` in messages): the items in the order they
 * start, or every problem found.
 */
export function readUpFile(
  file: string,
  source: string,
  exists: (path: string) => boolean = pathExists,
): UpFileResult {
  const lineCounter = new LineCounter();
  const doc = parseDocument(source, { lineCounter });
  if (doc.errors.length > 0) {
    return {
      ok: false,
      messages: doc.errors.map((error) =>
        `${file}:${error.linePos?.[0].line ?? 1}: ${
          error.message.replace(/\s+at line \d+.*$/s, "")
        }`
      ),
    };
  }
  const data = doc.toJS() ?? {};
  const result = NODE.safeParse(data);
  const say = (problems: { path: PropertyKey[]; what: string }[]) =>
    problems.map(({ path, what }) =>
      `${file}:${lineOf(doc, lineCounter, path)}: ${pathName(path)}: ${what}`
    );
  if (!result.success) {
    return {
      ok: false,
      messages: say(result.error.issues.flatMap((issue) => describeIssue(issue, data))),
    };
  }
  // Relative paths are the file's: a node file means the same from any folder (systemd
  // starts dst up in /).
  const node = resolvePaths(result.data, dirname(resolve(file)));
  const problems = [...missingPaths(node, exists), ...portClashes(node)];
  if (problems.length > 0) return { ok: false, messages: say(problems) };
  const count = (node.exports?.length ?? 0) + (node.arrays?.length ?? 0) +
    (node.attaches?.length ?? 0);
  if (count === 0) {
    return {
      ok: false,
      messages: [`${file}:1: nothing to run: give exports, arrays or attaches`],
    };
  }
  const ordered = startOrder(itemsOf(node, (path) => lineOf(doc, lineCounter, path)));
  if (ordered.cycle.length > 0) {
    const labels = ordered.cycle.map((item) => item.label);
    return {
      ok: false,
      messages: say([{
        path: [...ordered.cycle[0]!.at, "members"],
        what: `${labels.join(" and ")} are members of each other, so neither can start ` +
          "first: an array's member must be served by something that does not need it",
      }]),
    };
  }
  return {
    ok: true,
    node: {
      log: node.log ?? {},
      ...(node.metrics === undefined ? {} : { metrics: parseHostPort(node.metrics, "127.0.0.1") }),
    },
    items: ordered.items,
  };
}

/**
 * The files the node needs that are not there: an image without create, a key file, a
 * mirror's or array's local member. Found before anything starts, by --check too.
 */
function missingPaths(
  node: Node,
  exists: (path: string) => boolean,
): { path: PropertyKey[]; what: string }[] {
  const problems: { path: PropertyKey[]; what: string }[] = [];
  const keyFile = (key: string | undefined, path: PropertyKey[]) => {
    if (key !== undefined && !exists(key)) {
      problems.push({ path, what: `${key} does not exist; make it with: dst keygen ${key}` });
    }
  };
  keyFile(node.key, ["key"]);
  node.exports?.forEach((item, index) => {
    if (item.create === undefined && !exists(item.path)) {
      problems.push({
        path: ["exports", index, "path"],
        what: `${item.path} does not exist; add create: SIZE to make it (e.g. create: 10G)`,
      });
    }
    keyFile(item.key, ["exports", index, "key"]);
  });
  node.arrays?.forEach((item, index) => {
    item.members.forEach((member, at) => {
      // A path as `dst array` tells one from HOST:PORT: absolute or relative to here.
      if ((member.startsWith("/") || member.startsWith(".")) && !exists(member)) {
        problems.push({
          path: ["arrays", index, "members", at],
          what: `${member} does not exist (a local member is an image file or block device)`,
        });
      }
    });
    keyFile(item.key, ["arrays", index, "key"]);
  });
  node.attaches?.forEach((item, index) => keyFile(item.key, ["attaches", index, "key"]));
  return problems;
}

/** False only when nothing is there: a path we may not look at is the command's to report. */
function pathExists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (error) {
    return !(error instanceof Deno.errors.NotFound);
  }
}

function describeIssue(
  issue: z.core.$ZodIssue,
  data: unknown,
): { path: PropertyKey[]; what: string }[] {
  const path = issue.path;
  switch (issue.code) {
    case "unrecognized_keys": {
      const allowed = allowedKeys(path);
      return issue.keys.map((key) => {
        const meant = nearest(key, allowed);
        return {
          path: [...path, key],
          what: `unknown key${meant === undefined ? "" : `; did you mean ${meant}?`} ` +
            `(allowed: ${allowed.join(", ")})`,
        };
      });
    }
    case "invalid_type": {
      const value = valueAt(data, path);
      if (value === undefined) {
        const key = String(path.at(-1));
        return [{ path, what: `missing; ${REQUIRED[key] ?? `${key} is required`}` }];
      }
      return [{ path, what: `expected ${typeName(issue.expected)}, not ${typeOf(value)}` }];
    }
    case "invalid_value":
      return [{
        path,
        what: `${JSON.stringify(valueAt(data, path))} is not one of ${
          issue.values.map(String).join(", ")
        }`,
      }];
    case "too_small":
      return [{
        path,
        what: `needs at least ${issue.minimum} ${issue.minimum === 1 ? "entry" : "entries"}`,
      }];
    default:
      return [{ path, what: issue.message }];
  }
}

/** The keys the object at `path` may have. */
function allowedKeys(path: PropertyKey[]): string[] {
  const schema = path.length === 0
    ? NODE
    : path.at(-1) === "log"
    ? LOG
    : { exports: EXPORT, arrays: ARRAY, attaches: ATTACH }[String(path[0])];
  return schema === undefined ? [] : Object.keys(schema.shape);
}

function typeName(expected: string): string {
  return { string: "text", array: "a list", object: "a mapping", boolean: "true or false" }[
    expected
  ] ?? expected;
}

function typeOf(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "a mapping";
  return `${typeof value} ${JSON.stringify(value)}`;
}

function valueAt(data: unknown, path: PropertyKey[]): unknown {
  let value = data;
  for (const step of path) {
    if (value === null || typeof value !== "object") return undefined;
    value = (value as Record<PropertyKey, unknown>)[step];
  }
  return value;
}

/** "exports[1].listen" */
function pathName(path: PropertyKey[]): string {
  let name = "";
  for (const step of path) {
    name += typeof step === "number" ? `[${step}]` : `${name === "" ? "" : "."}${String(step)}`;
  }
  return name === "" ? "(top level)" : name;
}

/** The line of the key at `path`, or of the nearest enclosing node that exists. */
function lineOf(doc: Document, lineCounter: LineCounter, path: PropertyKey[]): number {
  for (let length = path.length; length >= 0; length--) {
    const parent = doc.getIn(path.slice(0, Math.max(0, length - 1)), true);
    const key = path[length - 1];
    // A key's own line (for an unknown or mistyped key), not its value's.
    if (length > 0 && isMap(parent)) {
      const pair = parent.items.find((item) => isNode(item.key) && item.key.toJSON() === key);
      if (pair !== undefined && isNode(pair.key) && pair.key.range) {
        return lineCounter.linePos(pair.key.range[0]).line;
      }
    }
    const node = doc.getIn(path.slice(0, length), true);
    if (isNode(node) && node.range) return lineCounter.linePos(node.range[0]).line;
  }
  return 1;
}

function itemsOf(node: Node, lineAt: (path: PropertyKey[]) => number): UpItem[] {
  const items: UpItem[] = [];
  const lines = (list: string, index: number, item: Record<string, unknown>) => ({
    at: [list, index] as [string, number],
    line: lineAt([list, index]),
    keyLines: Object.fromEntries(
      Object.keys(item).map((key) => [key, lineAt([list, index, key])]),
    ),
  });
  const common = (item: { key?: string }) => {
    const key = item.key ?? node.key;
    return key === undefined ? [] : ["--key", key];
  };
  node.exports?.forEach((item, index) => {
    items.push({
      label: `exports[${index}]`,
      args: ["export", item.path, ...flags(item), ...common(item)],
      servesPort: parseHostPort(item.listen ?? "", "0.0.0.0", EXPORT_PORT_DEFAULT).port,
      memberPorts: [],
      ...lines("exports", index, item),
    });
  });
  node.arrays?.forEach((item, index) => {
    items.push({
      label: `arrays[${index}]`,
      args: ["array", item.kind, ...item.members, ...flags(item), ...common(item)],
      servesPort: item.export === undefined
        ? null
        : parseHostPort(item.export, "0.0.0.0", EXPORT_PORT_DEFAULT).port,
      memberPorts: item.members.flatMap((member) => {
        try {
          return [parseHostPort(member, "127.0.0.1").port];
        } catch {
          return []; // a local path
        }
      }),
      ...lines("arrays", index, item),
    });
  });
  node.attaches?.forEach((item, index) => {
    items.push({
      label: `attaches[${index}]`,
      args: ["attach", item.remote, ...flags(item), ...common(item)],
      servesPort: null,
      memberPorts: [],
      ...lines("attaches", index, item),
    });
  });
  return items;
}

/** An item's keys as --flags, in the file's order (booleans are flags without a value). */
function flags(item: Record<string, unknown>): string[] {
  const args: string[] = [];
  for (const [name, value] of Object.entries(item)) {
    if (NOT_FLAGS.has(name) || value === undefined) continue;
    if (value === true) args.push(`--${name}`);
    else if (Array.isArray(value)) { for (const one of value) args.push(`--${name}`, String(one)); }
    else if (value !== false) args.push(`--${name}`, String(value));
  }
  return args;
}

/**
 * Exports first, attaches last, and an array after whatever in the file serves one of
 * its members' ports (an array of arrays); otherwise the file's order. Arrays that
 * wait for each other are a cycle, which nothing can start.
 */
function startOrder(items: UpItem[]): { items: UpItem[]; cycle: UpItem[] } {
  const ordered: UpItem[] = [];
  const attaches = items.filter((item) => item.args[0] === "attach");
  const waiting = items.filter((item) => item.args[0] !== "attach");
  while (waiting.length > 0) {
    const ready = waiting.findIndex((item) =>
      item.memberPorts.every((port) =>
        !waiting.some((other) => other !== item && other.servesPort === port)
      )
    );
    if (ready < 0) return { items: [], cycle: waiting.filter((item) => item.args[0] === "array") };
    ordered.push(waiting.splice(ready, 1)[0]!);
  }
  return { items: [...ordered, ...attaches], cycle: [] };
}

/** `path` made absolute against `dir` (the node file's folder). */
function against(dir: string, path: string): string {
  return isAbsolute(path) ? path : resolve(dir, path);
}

/**
 * The node with every relative path made the file's: images, state folders, key
 * files, sockets, devices, and local members (which start with "." or "/", as
 * `dst array` tells them from HOST:PORT).
 */
function resolvePaths(node: Node, dir: string): Node {
  const path = (value: string | undefined) => value === undefined ? undefined : against(dir, value);
  const defined = <T extends Record<string, unknown>>(item: T): T =>
    Object.fromEntries(Object.entries(item).filter(([, value]) => value !== undefined)) as T;
  return defined({
    ...node,
    key: path(node.key),
    exports: node.exports?.map((item) =>
      defined({
        ...item,
        path: against(dir, item.path),
        state: path(item.state),
        key: path(item.key),
      })
    ),
    arrays: node.arrays?.map((item) =>
      defined({
        ...item,
        members: item.members.map((member) =>
          member.startsWith(".") ? against(dir, member) : member
        ),
        state: path(item.state),
        key: path(item.key),
      })
    ),
    attaches: node.attaches?.map((item) =>
      defined({
        ...item,
        socket: path(item.socket),
        device: path(item.device),
        key: path(item.key),
      })
    ),
  });
}

/**
 * Two listeners of the file on one port (the same host, or one of them on every
 * interface): the second would fail to start, after the first had started.
 */
function portClashes(node: Node): { path: PropertyKey[]; what: string }[] {
  const listeners: { path: PropertyKey[]; address: HostPort }[] = [];
  const add = (
    path: PropertyKey[],
    text: string | undefined,
    host: string,
    port?: number,
    evenAbsent = false,
  ) => {
    if (text === undefined && !evenAbsent) return;
    listeners.push({ path, address: parseHostPort(text ?? "", host, port) });
  };
  add(["metrics"], node.metrics, "127.0.0.1");
  node.exports?.forEach((item, index) => {
    // Without listen, an export takes the default port: two such exports clash.
    add(["exports", index, "listen"], item.listen, "0.0.0.0", EXPORT_PORT_DEFAULT, true);
    add(["exports", index, "nbd"], item.nbd, "127.0.0.1", NBD_PORT_DEFAULT);
  });
  node.arrays?.forEach((item, index) => {
    add(["arrays", index, "export"], item.export, "0.0.0.0", EXPORT_PORT_DEFAULT);
    add(["arrays", index, "nbd"], item.nbd, "127.0.0.1", NBD_PORT_DEFAULT);
  });
  node.attaches?.forEach((item, index) => {
    add(["attaches", index, "listen"], item.listen, "127.0.0.1", NBD_PORT_DEFAULT);
  });
  const problems: { path: PropertyKey[]; what: string }[] = [];
  listeners.forEach((one, at) => {
    if (one.address.port === 0) return; // a free port each
    const first = listeners.slice(0, at).find((other) =>
      other.address.port === one.address.port &&
      (other.address.hostname === one.address.hostname ||
        isAllInterfaces(other.address.hostname) || isAllInterfaces(one.address.hostname))
    );
    if (first !== undefined) {
      problems.push({
        path: one.path,
        what: `port ${one.address.port} is ${pathName(first.path)}'s too: give each its own port` +
          (one.path.at(-1) === "listen" && node.exports?.[Number(one.path[1])]?.listen === undefined
            ? ` (an export without listen takes ${EXPORT_PORT_DEFAULT})`
            : ""),
      });
    }
  });
  return problems;
}
