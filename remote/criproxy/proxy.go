package criproxy

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"

	"github.com/distribution/reference"
	"google.golang.org/grpc"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Recorder keeps the credentials of a pull for a registry host (for
// example "registry.example.com:5000" or "docker.io"). An empty username
// with a secret is an identity (refresh) token.
type Recorder interface {
	Put(host, username, secret string)
}

// Server is a CRI ImageService that forwards every call to another one
// (containerd's) and records the credentials each PullImage carries.
type Server struct {
	runtime.UnimplementedImageServiceServer

	next runtime.ImageServiceClient
	rec  Recorder
}

// New returns a Server forwarding to the image service on conn and
// recording credentials in rec.
func New(conn grpc.ClientConnInterface, rec Recorder) *Server {
	return &Server{next: runtime.NewImageServiceClient(conn), rec: rec}
}

// Register serves s on srv as CRI's image service.
func (s *Server) Register(srv *grpc.Server) {
	runtime.RegisterImageServiceServer(srv, s)
}

// PullImage records the request's credentials for the image's registry
// before it forwards the request, so that they are there when containerd
// asks lazylayer for the image's layers. A request without credentials
// leaves what earlier pulls recorded alone.
func (s *Server) PullImage(ctx context.Context, req *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	if auth := req.GetAuth(); auth != nil && req.GetImage() != nil {
		// On an error containerd's CRI answers the request with an error
		// of its own; nothing is recorded.
		host, user, secret, ok, err := credentials(req.GetImage().GetImage(), auth)
		if err == nil && ok {
			s.rec.Put(host, user, secret)
		}
	}
	return s.next.PullImage(ctx, req)
}

// credentials returns the registry host of image and the username and
// secret auth gives for it, read the way containerd's CRI reads them. ok
// is false when auth names another server or holds nothing usable (a
// RegistryToken alone, which containerd does not use either).
func credentials(image string, auth *runtime.AuthConfig) (host, user, secret string, ok bool, err error) {
	named, err := reference.ParseDockerRef(image)
	if err != nil {
		return "", "", "", false, fmt.Errorf("parse image %q: %w", image, err)
	}
	host = reference.Domain(named)
	if auth.ServerAddress != "" {
		server := auth.ServerAddress
		if !strings.Contains(server, "://") {
			server = "https://" + server
		}
		u, err := url.Parse(server)
		if err != nil {
			return "", "", "", false, fmt.Errorf("parse server address: %w", err)
		}
		if !sameRegistry(u.Host, host) {
			return "", "", "", false, nil
		}
	}
	switch {
	case auth.Username != "":
		return host, auth.Username, auth.Password, true, nil
	case auth.IdentityToken != "":
		return host, "", auth.IdentityToken, true, nil
	case auth.Auth != "":
		b, err := base64.StdEncoding.DecodeString(auth.Auth)
		if err != nil {
			return "", "", "", false, fmt.Errorf("decode auth: %w", err)
		}
		u, p, found := strings.Cut(string(b), ":")
		if !found {
			return "", "", "", false, errors.New("decode auth: not user:password")
		}
		return host, u, strings.Trim(p, "\x00"), true, nil
	}
	return "", "", "", false, nil
}

// sameRegistry reports whether two registry host names are one; Docker
// Hub goes by several.
func sameRegistry(a, b string) bool {
	hub := func(h string) string {
		h = strings.ToLower(h)
		switch h {
		case "docker.io", "index.docker.io", "registry-1.docker.io":
			return "docker.io"
		}
		return h
	}
	return hub(a) == hub(b)
}

// ListImages forwards the call.
func (s *Server) ListImages(ctx context.Context, req *runtime.ListImagesRequest) (*runtime.ListImagesResponse, error) {
	return s.next.ListImages(ctx, req)
}

// StreamImages forwards the call and every reply it streams.
func (s *Server) StreamImages(req *runtime.StreamImagesRequest, out grpc.ServerStreamingServer[runtime.StreamImagesResponse]) error {
	in, err := s.next.StreamImages(out.Context(), req)
	if err != nil {
		return err
	}
	for {
		m, err := in.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := out.Send(m); err != nil {
			return err
		}
	}
}

// ImageStatus forwards the call.
func (s *Server) ImageStatus(ctx context.Context, req *runtime.ImageStatusRequest) (*runtime.ImageStatusResponse, error) {
	return s.next.ImageStatus(ctx, req)
}

// RemoveImage forwards the call.
func (s *Server) RemoveImage(ctx context.Context, req *runtime.RemoveImageRequest) (*runtime.RemoveImageResponse, error) {
	return s.next.RemoveImage(ctx, req)
}

// ImageFsInfo forwards the call.
func (s *Server) ImageFsInfo(ctx context.Context, req *runtime.ImageFsInfoRequest) (*runtime.ImageFsInfoResponse, error) {
	return s.next.ImageFsInfo(ctx, req)
}
