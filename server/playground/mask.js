// The image to edit and the mask painted over it. Strokes are drawn opaque on their own canvas (shown
// half transparent by CSS), so that the exported mask is exactly OpenAI's: alpha 0 where painted (edit),
// opaque elsewhere (keep), at the image's own width and height.

export class MaskPainter {
  constructor(picture, overlay, brush) {
    this.picture = picture;
    this.overlay = overlay;
    this.brush = brush;
    this.painted = false;
    this.last = null;
    overlay.addEventListener("pointerdown", (e) => this.start(e));
    overlay.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
      overlay.addEventListener(type, () => (this.last = null));
    }
  }

  // Show a file (or blob); the mask starts empty.
  async load(file) {
    const bitmap = await createImageBitmap(file);
    for (const canvas of [this.picture, this.overlay]) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    this.picture.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    this.clear();
  }

  clear() {
    this.overlay.getContext("2d").clearRect(0, 0, this.overlay.width, this.overlay.height);
    this.painted = false;
  }

  point(event) {
    const box = this.overlay.getBoundingClientRect();
    const scale = this.overlay.width / box.width;
    return { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale, scale };
  }

  start(event) {
    event.preventDefault();
    this.overlay.setPointerCapture?.(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const here = this.point(event);
    this.stroke(this.last, here);
    this.last = here;
  }

  stroke(from, to) {
    const ctx = this.overlay.getContext("2d");
    ctx.strokeStyle = "#ff2d55";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number(this.brush.value) * to.scale;
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    this.painted = true;
  }

  // The mask as a PNG blob, or null when nothing is painted (image to image).
  async maskBlob() {
    if (!this.painted) return null;
    const mask = document.createElement("canvas");
    mask.width = this.overlay.width;
    mask.height = this.overlay.height;
    const ctx = mask.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, mask.width, mask.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(this.overlay, 0, 0);
    return new Promise((resolve) => mask.toBlob(resolve, "image/png"));
  }

  // Paint back a mask made earlier (alpha 0 = painted), for "use these settings again".
  async restore(maskBlob) {
    this.clear();
    if (!maskBlob) return;
    const bitmap = await createImageBitmap(maskBlob);
    const ctx = this.overlay.getContext("2d");
    ctx.fillStyle = "#ff2d55";
    ctx.fillRect(0, 0, this.overlay.width, this.overlay.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(bitmap, 0, 0, this.overlay.width, this.overlay.height);
    ctx.globalCompositeOperation = "source-over";
    bitmap.close();
    this.painted = true;
  }
}
