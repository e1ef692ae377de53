/** Hex text for ids and digests. */

export function bytesToHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Parses hex text; characters that are not hex digits read as zero nibbles. */
export function hexToBytes(hex: string): Uint8Array {
  const bytes = new Uint8Array(hex.length >> 1);
  for (let i = 0; i < bytes.length; i++) {
    bytes[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16) || 0;
  }
  return bytes;
}

/** The SHA-256 digest of `text` (UTF-8) as 64 hex digits; ids take the first 32. */
export async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest({ name: "SHA-256" }, new TextEncoder().encode(text));
  return bytesToHex(new Uint8Array(digest));
}

/** A fresh random id of 32 hex digits, like an export id (a new mirror). */
export function randomId(): string {
  return bytesToHex(crypto.getRandomValues(new Uint8Array(16)));
}
