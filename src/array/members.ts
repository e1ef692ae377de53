/**
 * Opening an array's members: HOST:PORT is a DST export (a RemoteDevice, which may
 * itself be an array's export: that is how trees are built); anything that names a
 * file (a path starting with / or ., or one that exists) is opened locally.
 *
 * Each opened member comes with its write generation, so a mirror can tell whether
 * someone else wrote to it: a remote one reports it in the handshake (we connect as
 * a writer, with the mirror's identity); a local one is kept the way `dst export`
 * keeps it, in the exports state folder, and granted here the same way.
 */

import { existsSync } from "node:fs";
import { RemoteDevice, type RemoteDeviceOptions } from "../client/remote_device.ts";
import { EXPORT_PORT_DEFAULT } from "../constants.ts";
import type { BlockDevice } from "../device/block_device.ts";
import { FileDevice } from "../device/file_device.ts";
import { parseHostPort } from "../lib/address.ts";
import { bytesToHex } from "../lib/hex.ts";
import { defaultExportStateDir, PersistedGeneration } from "../server/write_generation.ts";

export interface OpenedMember {
  device: BlockDevice;
  /** The write generation this opening was granted, and the epoch it counts in. */
  generation: number;
  epoch: string;
}

/** True when `name` is opened as a local file or device rather than dialed as HOST:PORT. */
export function isLocalMember(name: string): boolean {
  return name.startsWith("/") || name.startsWith(".") || existsSync(name);
}

/**
 * The export id of `name`, without writing to it: a local file opened read-only, or a
 * reader's connection, which starts no write generation and takes no lease. A mirror
 * asks it before it opens its legs as their writer, to find its state folder (whose
 * identity that writer is).
 */
export async function identifyMember(
  name: string,
  client: RemoteDeviceOptions,
): Promise<string> {
  const device = isLocalMember(name)
    ? await FileDevice.open(name, { readOnly: true })
    : await RemoteDevice.connect(parseHostPort(name, "127.0.0.1", EXPORT_PORT_DEFAULT), {
      ...client,
      writer: false,
      retries: 0,
    });
  try {
    return device.info.id;
  } finally {
    await device.close();
  }
}

export async function openMember(
  name: string,
  client: RemoteDeviceOptions,
): Promise<OpenedMember> {
  if (isLocalMember(name)) {
    const device = await FileDevice.open(name, { readOnly: false });
    try {
      // The same writer as towards remote legs: a restarted mirror starts no new generation.
      const writer = bytesToHex(client.clientId ?? crypto.getRandomValues(new Uint8Array(16)));
      const state = PersistedGeneration.open(defaultExportStateDir(), device.info.id);
      const generation = await state.grant(writer);
      return { device, generation, epoch: state.epoch };
    } catch (error) {
      await device.close();
      throw error;
    }
  }
  const address = parseHostPort(name, "127.0.0.1", EXPORT_PORT_DEFAULT);
  const device = await RemoteDevice.connect(address, { ...client, writer: true });
  return { device, generation: device.writeGeneration, epoch: device.writeEpoch };
}
