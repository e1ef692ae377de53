/**
 * Where a run of `deno task bench` is kept: its whole printed output, as markdown, in
 * bench/results/YYYY-MM-DD.md (-2, -3, ... for a day's later runs), under a header
 * saying when, at which commit, with which Deno, on which CPU and by which command it
 * ran. A figure quoted in the README can then be traced to the run it came from.
 */

/** The folder of results files, at the repository's root. */
export const RESULTS_DIR = new URL("../../bench/results/", import.meta.url);

const ROOT = new URL("../../", import.meta.url);

/** What a results file's header says about its run. */
export interface RunInfo {
  /** When the run started. */
  started: Date;
  /** How long it took, in seconds. */
  seconds: number;
  /** `git rev-parse --short HEAD`, or why it is unknown. */
  commit: string;
  /** Paths with changes not committed (results files left out); null when git could not say. */
  dirtyPaths: string[] | null;
  deno: string;
  cpu: string;
  command: string;
}

/**
 * The name of a run's file: its UTC day, `YYYY-MM-DD.md`; when that day already has
 * files in `existing`, `YYYY-MM-DD-N.md` with N one more than the highest there (the
 * first file counting as 1), so the names of a day's runs sort in the order they ran.
 */
export function resultsFileName(date: Date, existing: Iterable<string>): string {
  const day = date.toISOString().slice(0, 10);
  const suffix = new RegExp(`^${day}(?:-(\\d+))?\\.md$`);
  let highest = 0;
  for (const name of existing) {
    const match = suffix.exec(name);
    if (match) highest = Math.max(highest, match[1] === undefined ? 1 : Number(match[1]));
  }
  return highest === 0 ? `${day}.md` : `${day}-${highest + 1}.md`;
}

/** "2 × Intel(R) Xeon(R) Processor" from /proc/cpuinfo's text (each distinct model counted). */
export function cpuSummary(cpuinfo: string): string {
  const counts = new Map<string, number>();
  for (const match of cpuinfo.matchAll(/^model name\s*:\s*(.*)$/gm)) {
    const model = match[1]!.trim();
    counts.set(model, (counts.get(model) ?? 0) + 1);
  }
  if (counts.size === 0) return "unknown (no model name in /proc/cpuinfo)";
  return [...counts].map(([model, count]) => `${count} × ${model}`).join(", ");
}

/**
 * The output's lines with a blank line before and after each table: in markdown a
 * line of text right before a table's header, or right after its last row, would be
 * read as part of it. Runs of blank lines become one, and the ends are trimmed.
 */
export function markdownBody(output: string): string {
  const isRow = (line: string) => line.startsWith("|");
  const lines: string[] = [];
  for (const line of output.split("\n").map((text) => text.trimEnd())) {
    const previous = lines.at(-1);
    const boundary = previous !== undefined && previous !== "" && isRow(previous) !== isRow(line);
    if (boundary && line !== "") lines.push("");
    if (line === "" && (previous === undefined || previous === "")) continue;
    lines.push(line);
  }
  while (lines.at(-1) === "") lines.pop();
  return lines.join("\n");
}

/** The whole results file: the header, then the run's output. */
export function resultsMarkdown(info: RunInfo, output: string): string {
  const when = `${info.started.toISOString().slice(0, 19).replace("T", " ")} UTC`;
  return [
    `# Bench run, ${when}`,
    "",
    `- started: ${when}, took ${Math.round(info.seconds)} s`,
    `- commit: ${info.commit} (${treeState(info.dirtyPaths)})`,
    `- deno: ${info.deno}`,
    `- CPU: ${info.cpu}`,
    `- command: \`${info.command}\``,
    "",
    markdownBody(output),
    "",
  ].join("\n");
}

function treeState(dirtyPaths: string[] | null): string {
  if (dirtyPaths === null) return "whether the tree was clean is unknown";
  if (dirtyPaths.length === 0) return "clean tree";
  const shown = dirtyPaths.slice(0, 10).join(", ");
  const more = dirtyPaths.length > 10 ? `, and ${dirtyPaths.length - 10} more` : "";
  return `dirty tree: uncommitted changes in ${shown}${more}`;
}

/**
 * The header's facts that do not depend on the run: commit, tree, Deno, CPU, and the
 * command. Taken before the run starts, so they describe the code that ran.
 */
export async function runFacts(args: string[]): Promise<Omit<RunInfo, "started" | "seconds">> {
  const head = await git(["rev-parse", "--short", "HEAD"]);
  // Earlier results files not yet committed change no code, so they do not make the tree dirty.
  const status = await git(["status", "--porcelain", "--", ".", ":(exclude)bench/results"]);
  return {
    commit: head.ok ? head.out.trim() : `unknown (${head.out.trim()})`,
    dirtyPaths: status.ok ? status.out.split("\n").filter(Boolean).map((l) => l.slice(3)) : null,
    deno: `${Deno.version.deno} (V8 ${Deno.version.v8}, TypeScript ${Deno.version.typescript})`,
    cpu: await readCpu(),
    command: commandLine(args),
  };
}

/**
 * How the bench was started. `deno task` sets INIT_CWD; without it the file was run
 * directly, and the line says so, with the flags the task would have passed.
 */
function commandLine(args: string[]): string {
  const start = Deno.env.has("INIT_CWD")
    ? "deno task bench"
    : "deno run -A --v8-flags=--expose-gc tests/bench/main.ts";
  return [start, ...args].join(" ");
}

async function readCpu(): Promise<string> {
  try {
    return cpuSummary(await Deno.readTextFile("/proc/cpuinfo"));
  } catch (error) {
    const cores = navigator.hardwareConcurrency;
    return `${cores} CPUs, model unknown (/proc/cpuinfo: ${(error as Error).message})`;
  }
}

async function git(args: string[]): Promise<{ ok: boolean; out: string }> {
  try {
    const result = await new Deno.Command("git", {
      args,
      cwd: ROOT,
      stdout: "piped",
      stderr: "piped",
    })
      .output();
    const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
    return { ok: result.success, out: decode(result.success ? result.stdout : result.stderr) };
  } catch (error) {
    return { ok: false, out: `git: ${(error as Error).message}` };
  }
}

/**
 * Writes the run's file into `dir` and returns its name. The name is taken with
 * createNew, so two runs finishing at once cannot overwrite each other's file.
 */
export async function writeResults(dir: URL, info: RunInfo, output: string): Promise<string> {
  await Deno.mkdir(dir, { recursive: true });
  const text = resultsMarkdown(info, output);
  for (;;) {
    const existing: string[] = [];
    for await (const entry of Deno.readDir(dir)) existing.push(entry.name);
    const name = resultsFileName(info.started, existing);
    try {
      await Deno.writeTextFile(new URL(name, dir), text, { createNew: true });
      return name;
    } catch (error) {
      if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
    }
  }
}

/** The text printed while a capture runs; stop() puts the console back. */
export interface Capture {
  text(): string;
  stop(): void;
}

/**
 * Records everything the bench prints through the console while still printing it
 * exactly as before: each section prints its own lines (some from inside the bench,
 * such as a skipped peer), so recording here keeps the results file and the terminal
 * the same text.
 */
export function captureConsole(): Capture {
  const lines: string[] = [];
  const methods = ["log", "info", "warn", "error"] as const;
  const originals = methods.map((method) => console[method]);
  for (const [i, method] of methods.entries()) {
    console[method] = (...args: unknown[]) => {
      lines.push(args.map((arg) => typeof arg === "string" ? arg : Deno.inspect(arg)).join(" "));
      originals[i]!(...args);
    };
  }
  return {
    text: () => lines.join("\n"),
    stop: () => methods.forEach((method, i) => console[method] = originals[i]!),
  };
}
