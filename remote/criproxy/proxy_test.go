package criproxy

import (
	"context"
	"encoding/base64"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// upstream is a fake containerd image service: it remembers what reached it.
type upstream struct {
	runtime.UnimplementedImageServiceServer
	mu     sync.Mutex
	pulled []*runtime.PullImageRequest
}

func (u *upstream) PullImage(_ context.Context, req *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.pulled = append(u.pulled, req)
	if req.GetImage().GetImage() == "refused.example/x:1" {
		return nil, status.Error(codes.PermissionDenied, "401 from the registry")
	}
	return &runtime.PullImageResponse{ImageRef: "sha256:abc"}, nil
}

func (u *upstream) ImageFsInfo(context.Context, *runtime.ImageFsInfoRequest) (*runtime.ImageFsInfoResponse, error) {
	return &runtime.ImageFsInfoResponse{ImageFilesystems: []*runtime.FilesystemUsage{{Timestamp: 42}}}, nil
}

func (u *upstream) StreamImages(_ *runtime.StreamImagesRequest, out grpc.ServerStreamingServer[runtime.StreamImagesResponse]) error {
	for _, id := range []string{"a", "b"} {
		if err := out.Send(&runtime.StreamImagesResponse{Images: []*runtime.Image{{Id: id}}}); err != nil {
			return err
		}
	}
	return nil
}

type recorder map[string][2]string

func (r recorder) Put(host, user, secret string) { r[host] = [2]string{user, secret} }

func serveUnix(t *testing.T, register func(*grpc.Server)) *grpc.ClientConn {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	register(srv)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestProxy(t *testing.T) {
	up := &upstream{}
	upConn := serveUnix(t, func(s *grpc.Server) { runtime.RegisterImageServiceServer(s, up) })
	rec := recorder{}
	c := runtime.NewImageServiceClient(serveUnix(t, New(upConn, rec).Register))
	ctx := t.Context()

	basic := base64.StdEncoding.EncodeToString([]byte("bob:pw:x"))
	for _, tc := range []struct {
		image string
		auth  *runtime.AuthConfig
	}{
		{"r.example:5000/app:1", &runtime.AuthConfig{Username: "alice", Password: "s3cret"}},
		{"busybox", &runtime.AuthConfig{Auth: basic, ServerAddress: "https://index.docker.io/v1/"}},
		{"q.example/app@sha256:" + "0123456789012345678901234567890123456789012345678901234567890123", &runtime.AuthConfig{IdentityToken: "refresh"}},
		{"other.example/app:1", &runtime.AuthConfig{Username: "eve", Password: "x", ServerAddress: "r.example:5000"}},
		{"anon.example/app:1", nil},
		{"token.example/app:1", &runtime.AuthConfig{RegistryToken: "t"}},
	} {
		resp, err := c.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: tc.image}, Auth: tc.auth})
		if err != nil || resp.ImageRef != "sha256:abc" {
			t.Fatalf("PullImage %s: %v, %v", tc.image, resp, err)
		}
	}
	want := recorder{
		"r.example:5000": {"alice", "s3cret"},
		"docker.io":      {"bob", "pw:x"},
		"q.example":      {"", "refresh"},
	}
	if len(rec) != len(want) {
		t.Errorf("recorded %v, want %v", rec, want)
	}
	for h, w := range want {
		if rec[h] != w {
			t.Errorf("credentials for %s: %q, want %q", h, rec[h], w)
		}
	}
	if len(up.pulled) != 6 || up.pulled[0].GetAuth().GetPassword() != "s3cret" {
		t.Errorf("containerd got %d pulls (first with password %q), want 6 forwarded as they were", len(up.pulled), up.pulled[0].GetAuth().GetPassword())
	}

	_, err := c.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: "refused.example/x:1"}})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("a refused pull answered %v, want containerd's PermissionDenied", err)
	}
	fs, err := c.ImageFsInfo(ctx, &runtime.ImageFsInfoRequest{})
	if err != nil || len(fs.ImageFilesystems) != 1 || fs.ImageFilesystems[0].Timestamp != 42 {
		t.Errorf("ImageFsInfo = %v, %v; want containerd's answer", fs, err)
	}
	if _, err := c.ListImages(ctx, &runtime.ListImagesRequest{}); status.Code(err) != codes.Unimplemented {
		t.Errorf("ListImages = %v, want the upstream's Unimplemented", err)
	}
	stream, err := c.StreamImages(ctx, &runtime.StreamImagesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for {
		m, err := stream.Recv()
		if err != nil {
			break
		}
		ids = append(ids, m.Images[0].Id)
	}
	if len(ids) != 2 || ids[0] != "a" || ids[1] != "b" {
		t.Errorf("StreamImages streamed %v, want [a b]", ids)
	}
}
