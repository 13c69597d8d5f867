// The browser codec's errors, with the same stable snake_case codes as edge_client.errors (Python):
//
//   AlignedVQError      alignedvq_error
//   ├── BundleError     bad_bundle          a bundle is malformed or fails its shape/hash checks
//   ├── ImageError      bad_image           pixels of the wrong size or type
//   └── IndexRangeError index_out_of_range  an index or statistic outside its field

export class AlignedVQError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
    this.code = new.target.code;
  }
}
AlignedVQError.code = "alignedvq_error";

export class BundleError extends AlignedVQError {}
BundleError.code = "bad_bundle";

export class ImageError extends AlignedVQError {}
ImageError.code = "bad_image";

export class IndexRangeError extends AlignedVQError {}
IndexRangeError.code = "index_out_of_range";
