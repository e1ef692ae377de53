/**
 * Linux errno values, which both wire protocols carry (DST's error codes and NBD's are
 * errno values by design), and the one mapping from a thrown error to them.
 */

import { DeviceError } from "./errors.ts";

export const Errno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** The errno a failed request reports: a DeviceError's own when it has a wire value, else EIO. */
export function errnoOf(error: unknown): number {
  if (error instanceof DeviceError) {
    return (Errno as Record<string, number>)[error.errno] ?? Errno.EIO;
  }
  return Errno.EIO;
}
