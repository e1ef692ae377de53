/**
 * The kernel side of `dst attach --device`: checks that the kernel's nbd driver and
 * nbd-client are there (and says what to do when not), connects /dev/nbdN to our NBD
 * server, and disconnects it on exit.
 */

import { DstError } from "../lib/errors.ts";
import type { NbdListen } from "../nbd/mod.ts";

export interface KernelDevice {
  detach(): Promise<void>;
}

export async function checkKernelDevice(path: string): Promise<void> {
  if (!/^\/dev\/nbd\d+$/.test(path)) {
    throw new DstError(
      "DEVICE",
      `--device must name an NBD device such as /dev/nbd0, not "${path}"`,
    );
  }
  const hasDriver = await exists("/sys/module/nbd") || await exists(path);
  if (!hasDriver) {
    throw new DstError(
      "DEVICE",
      `the kernel has no nbd driver loaded here (${path} does not exist): run \`modprobe nbd\` as root, ` +
        "or use the printed NBD URI with a user-space client (nbdfuse, qemu, nbdcopy)",
    );
  }
  if (!(await onPath("nbd-client"))) {
    throw new DstError(
      "DEVICE",
      "nbd-client is not installed: install it (Debian: apt-get install nbd-client)",
    );
  }
}

export async function attachKernelDevice(
  path: string,
  listen: NbdListen,
  name: string,
): Promise<KernelDevice> {
  const where = "unix" in listen
    ? ["-unix", listen.unix]
    : [listen.tcp.hostname, String(listen.tcp.port)];
  const args = [...where, path, "-b", "4096", ...(name === "" ? [] : ["-N", name])];
  await run(["nbd-client", ...args]);
  return { detach: () => run(["nbd-client", "-d", path]) };
}

async function run(command: string[]): Promise<void> {
  const output = await new Deno.Command(command[0]!, {
    args: command.slice(1),
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  if (!output.success) {
    const stderr = new TextDecoder().decode(output.stderr).trim();
    throw new DstError(
      "DEVICE",
      `\`${command.join(" ")}\` failed (exit ${output.code}): ${stderr}`,
    );
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

async function onPath(program: string): Promise<boolean> {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    if (dir !== "" && await exists(`${dir}/${program}`)) return true;
  }
  return false;
}
