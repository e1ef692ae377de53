/**
 * Running the real NBD peers (nbdinfo, nbdcopy, nbdsh, qemu-img, nbdfuse, e2fsprogs)
 * from tests. A test that needs a missing tool is skipped with the reason printed,
 * as nbdkit's tests `requires` a program; .ci/run installs them all, so CI skips none.
 */

/** nbdsh runs the first python3 on PATH, which must be the one with Debian's libnbd module. */
const TOOL_PATH = `/usr/bin:/usr/sbin:/sbin:/bin:${Deno.env.get("PATH") ?? ""}`;

function onPath(tool: string): boolean {
  for (const dir of TOOL_PATH.split(":")) {
    try {
      if (dir !== "" && Deno.statSync(`${dir}/${tool}`).isFile) return true;
    } catch {
      // not here
    }
  }
  return false;
}

/** For Deno.test's `ignore`: true (with the reason printed once) when a tool is missing. */
export function missing(...tools: string[]): boolean {
  const absent = tools.filter((tool) => !onPath(tool));
  if (absent.length === 0) return false;
  console.warn(`SKIP: ${absent.join(", ")} not installed (bash .ci/run installs them)`);
  return true;
}

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a tool to completion; `input` is written to its stdin. A missing tool exits 127, as in a shell. */
export async function tool(command: string, args: string[], input?: string): Promise<ToolResult> {
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(command, {
      args,
      env: { PATH: TOOL_PATH },
      stdin: input === undefined ? "null" : "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      return { code: 127, stdout: "", stderr: `${command}: not found` };
    }
    throw error;
  }
  if (input !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(input));
    await writer.close();
  }
  const output = await child.output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

/** Runs a tool and throws with its output unless it exits 0. */
export async function toolOk(command: string, args: string[], input?: string): Promise<string> {
  const result = await tool(command, args, input);
  if (result.code !== 0) {
    throw new Error(
      `${command} ${args.join(" ")} exited ${result.code}:\n${result.stdout}\n${result.stderr}`,
    );
  }
  return result.stdout;
}

/** Starts a long-running tool (nbdfuse) in the background. */
export function spawnTool(command: string, args: string[]): Deno.ChildProcess {
  return new Deno.Command(command, {
    args,
    env: { PATH: TOOL_PATH },
    stdout: "null",
    stderr: "piped",
  }).spawn();
}

/**
 * Starts a tool that a test talks to while it runs (an nbdsh script that says when it
 * is ready and waits for a line before it goes on): stdin, stdout and stderr piped.
 */
export function spawnToolPiped(command: string, args: string[]): Deno.ChildProcess {
  return new Deno.Command(command, {
    args,
    env: { PATH: TOOL_PATH },
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/** `qemu-img compare` of two raw images (paths or NBD URIs); throws unless they are identical. */
export async function assertImagesIdentical(a: string, b: string): Promise<void> {
  const compare = await tool("qemu-img", ["compare", "-f", "raw", "-F", "raw", a, b]);
  if (compare.code !== 0 || !/Images are identical/.test(compare.stdout)) {
    throw new Error(
      `qemu-img compare ${a} ${b} (exit ${compare.code}):\n${compare.stdout}${compare.stderr}`,
    );
  }
}
