/** Stable ids for arrays: a digest of what defines them, as 32 hex digits like an export id. */

import { bytesToHex } from "../lib/hex.ts";

export async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return bytesToHex(new Uint8Array(digest));
}

/** A fresh random id (a new mirror). */
export function randomId(): string {
  return bytesToHex(crypto.getRandomValues(new Uint8Array(16)));
}
