/**
 * Attachments: files from the picker, a drop or a paste, read as data URLs (the service takes
 * `data:<mime>;base64,...` parts). Images become `image_url` parts, videos `video_url` parts.
 */

/** @returns {boolean} whether the file is an image or a video the page can attach */
export function accepted(file) {
  return file.type.startsWith("image/") || file.type.startsWith("video/");
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error || new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

/** @returns {Promise<{name: string, type: string, size: number, kind: string, url: string}>} */
export async function toAttachment(file) {
  const kind = file.type.startsWith("video/") ? "video" : "image";
  return { name: file.name, type: file.type, size: file.size, kind, url: await readAsDataUrl(file) };
}

/** The message content parts for a prompt and its attachments (text first). */
export function contentParts(text, attachments) {
  const parts = text ? [{ type: "text", text }] : [];
  for (const item of attachments) {
    if (item.kind === "video") {
      parts.push({ type: "video_url", video_url: { url: item.url } });
    } else {
      parts.push({ type: "image_url", image_url: { url: item.url } });
    }
  }
  return parts;
}

/** "1.2 MB"-style size. */
export function formatBytes(bytes) {
  if (bytes < 1024) {
    return `${bytes} B`;
  }
  const units = ["KB", "MB", "GB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}
