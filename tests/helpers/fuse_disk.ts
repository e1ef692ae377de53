/**
 * An NBD disk as a plain file, through nbdfuse, for the tools that want a file
 * (mkfs.ext4, debugfs, e2fsck). Only the mount and unmount; the tools themselves
 * are run with tools.ts.
 */

import { spawnTool, tool } from "./tools.ts";
import { waitUntil } from "./wait.ts";

/**
 * Mounts `uri` as the file `mountpoint/disk` with nbdfuse, runs `body`, unmounts.
 * With `readOnly`, nbdfuse opens the disk read-only (`-r`): nothing can be written.
 */
export async function withFuseDisk(
  uri: string,
  mountpoint: string,
  body: (disk: string) => Promise<void>,
  options: { readOnly?: boolean } = {},
): Promise<void> {
  await Deno.mkdir(mountpoint, { recursive: true });
  const fuse = spawnTool("nbdfuse", [
    ...(options.readOnly === true ? ["-r"] : []),
    `${mountpoint}/disk`,
    uri,
  ]);
  try {
    const mounted = async () =>
      ((await Deno.stat(`${mountpoint}/disk`).catch(() => null))?.size ?? 0) > 0;
    await waitUntil(mounted, "nbdfuse to expose the disk", { timeoutMs: 10_000, everyMs: 50 });
    await body(`${mountpoint}/disk`);
  } finally {
    const unmounted = await tool("fusermount3", ["-u", mountpoint]);
    if (unmounted.code !== 0) await tool("umount", [mountpoint]);
    await fuse.status;
  }
}
