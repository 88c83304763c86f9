package kubecluster

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"slices"
	"testing"
)

// TestRelayImage builds the relay image from this checkout and reads the
// docker-archive back as `ctr images import` would: one manifest with the
// tag, a config with the Dockerfile's user, entrypoint and ports, and one
// layer holding exactly /relay (executable) and the CA bundle.
func TestRelayImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the relay; skipped in -short mode")
	}
	root, err := moduleRoot(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	const ref = "ghcr.io/tsrelay/relay:test"
	img, err := RelayImage(t.Context(), root, t.TempDir(), ref, "image-test")
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteDockerArchive(&buf, img); err != nil {
		t.Fatal(err)
	}
	files := readTar(t, buf.Bytes())
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	if len(manifest) != 1 || !slices.Equal(manifest[0].RepoTags, []string{ref}) || len(manifest[0].Layers) != 1 {
		t.Fatalf("manifest.json = %+v, want one image tagged %s with one layer", manifest, ref)
	}
	var config struct {
		Architecture string
		OS           string
		Config       struct {
			User         string
			Entrypoint   []string
			ExposedPorts map[string]struct{}
			Labels       map[string]string
		}
	}
	if err := json.Unmarshal(files[manifest[0].Config], &config); err != nil {
		t.Fatalf("config: %v", err)
	}
	if config.Config.User != "65532:65532" || !slices.Equal(config.Config.Entrypoint, []string{"/relay"}) {
		t.Errorf("config user %q entrypoint %q, want the Dockerfile's 65532:65532 and [/relay]", config.Config.User, config.Config.Entrypoint)
	}
	for _, p := range []string{"61441/udp", "9002/tcp"} {
		if _, ok := config.Config.ExposedPorts[p]; !ok {
			t.Errorf("config exposes %v, want %s among them", config.Config.ExposedPorts, p)
		}
	}
	if v := config.Config.Labels["org.opencontainers.image.version"]; v != "image-test" {
		t.Errorf("version label %q, want image-test", v)
	}
	layer := readTarHeaders(t, files[manifest[0].Layers[0]])
	var regular []string
	for name, hdr := range layer {
		if hdr.Typeflag == tar.TypeReg {
			regular = append(regular, name)
		}
		if hdr.Uid != 0 || hdr.Gid != 0 {
			t.Errorf("%s owned by %d:%d, want root", name, hdr.Uid, hdr.Gid)
		}
	}
	slices.Sort(regular)
	if want := []string{"etc/ssl/certs/ca-certificates.crt", "relay"}; !slices.Equal(regular, want) {
		t.Errorf("layer files %q, want %q", regular, want)
	}
	if m := layer["relay"].Mode; m&0o111 == 0 {
		t.Errorf("relay mode %o, want executable", m)
	}
}

// readTar returns the regular files of a tar by name.
func readTar(t *testing.T, b []byte) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Typeflag == tar.TypeReg {
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[hdr.Name] = data
		}
	}
}

// readTarHeaders returns a tar's headers by name.
func readTarHeaders(t *testing.T, b []byte) map[string]*tar.Header {
	t.Helper()
	hdrs := map[string]*tar.Header{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return hdrs
		}
		if err != nil {
			t.Fatal(err)
		}
		hdrs[hdr.Name] = hdr
	}
}
